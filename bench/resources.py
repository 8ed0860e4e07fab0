"""What a bench's process has used so far, for the CPU time and page faults per row or pair it reports."""

import resource


def usage() -> tuple[float, int]:
    """CPU seconds (user and system) and minor page faults so far, of this process and of its children that ended."""
    this, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(u.ru_utime + u.ru_stime for u in (this, children)), this.ru_minflt + children.ru_minflt)
