"""The package's log handler, shared by the CLI and by sweep worker processes (a spawned worker is a
fresh interpreter and needs it too)."""
import logging
import warnings


def configure_logging() -> None:
    """`orca_lora` log lines with a timestamp (grep-able); Lightning keeps its own handler."""
    logger = logging.getLogger("orca_lora")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s orca_lora %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    # Lightning 2.6 against torch 2.14 warns about its own use of a deprecated pytree API
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
