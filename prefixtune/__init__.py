"""prefixtune: prefix tuning (Li & Liang 2021) for Hugging Face transformers models."""

__version__ = "0.1.0"

from .config import PrefixConfig  # noqa: E402
from .model import PrefixModel  # noqa: E402

__all__ = ["PrefixConfig", "PrefixModel", "__version__"]
