from orca_lora.errors import RunInterrupted
from orca_lora.sweeps.stopping import SweepInterrupted, exit_code, signal_name


def test_the_exit_code_is_the_shells_for_the_signal():
    assert exit_code(RunInterrupted("SIGTERM")) == 143 and exit_code(RunInterrupted("SIGINT")) == 130
    assert exit_code(SweepInterrupted("SIGINT", 2, 3)) == 130


def test_the_signal_is_found_in_an_interruption_omegaconf_rebuilt():
    # what a SIGINT raised inside OmegaConf's DictConfig() came back as (it rebuilds the exception from its text)
    rebuilt = RunInterrupted("interrupted by interrupted by SIGINT; run the same command to resume\n"
                             "    full_key: stage2.enabled\n    object_type=dict")
    assert signal_name(rebuilt) == "SIGINT" and exit_code(rebuilt) == 130
    assert signal_name(RunInterrupted("garbled")) == "SIGTERM"
