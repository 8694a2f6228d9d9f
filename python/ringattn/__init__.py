"""ringattn: exact distributed ring attention. ringattn.torch and ringattn.jax hold the framework ops."""
from ._abi import LAYOUTS, RingAttnError, library_path

__version__ = "0.1.0"
__all__ = ["LAYOUTS", "RingAttnError", "library_path", "api_version", "__version__"]


def api_version() -> tuple:
    """(major, minor) of the loaded libringattn_c."""
    from ._abi import lib
    v = lib().ringattn_api_version()
    return v >> 16, v & 0xFFFF
