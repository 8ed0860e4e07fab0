"""Whether the Hugging Face hub answers, asked once: its downloads retry a hub that does not for about 23 s."""

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError


def hub_answers(repo_id: str, filename: str, repo_type: str = "model") -> bool:
    """Whether one request for a file of the repo gets an answer (the file or repo may still be missing)."""
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type=repo_type))
    except HfHubHTTPError:
        return True  # gated, missing or failing: the download says which
    except Exception:  # offline mode, or no connection, DNS or proxy: the transport's error types are its own
        return False
    return True


def hub_silence() -> str:
    """Why the hub did not answer, for an error message."""
    return "offline mode is set (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} does not answer"
