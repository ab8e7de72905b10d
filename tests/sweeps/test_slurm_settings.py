import pytest

from orca_lora.config import ConfigError
from orca_lora.sweeps.slurm_settings import executor_parameters, minutes, slurm_settings


@pytest.mark.parametrize("value, expected", [(90, 90), ("90", 90), ("45:30", 46), ("1:30:00", 90),
                                             ("2-00:00:00", 2880), ("2-12", 3600)])
def test_slurm_time_formats_are_minutes(value, expected):
    assert minutes(value) == expected


def test_flags_replace_the_files_settings_and_slurm_parameters_pass_through():
    settings = slurm_settings({"partition": "gpu", "time": "2:00:00", "gpus_per_job": 1, "slurm_qos": "high"},
                              {"partition": "debug", "cpus_per_job": 8, "time": None})
    assert (settings.partition, settings.time, settings.cpus_per_job) == ("debug", 120, 8)
    assert executor_parameters(settings, "orca-lora-s") == {
        "name": "orca-lora-s", "timeout_min": 120, "slurm_array_parallelism": 256, "slurm_partition": "debug",
        "slurm_gres": "gpu:1", "local_gpus_per_node": 1, "cpus_per_task": 8, "slurm_qos": "high"}


@pytest.mark.parametrize("section, message", [
    ({"gpus": 1}, r"^unknown slurm setting\(s\) \['gpus'\]"),
    ({"cluster": "pbs"}, "^slurm.cluster: 'pbs' is not one of slurm, local"),
    ({"time": "soon"}, "^slurm.time: 'soon' is not a time limit"),
    ({"max_array_size": 0}, "^slurm.max_array_size: 0 must be a whole number >= 1"),
])
def test_bad_settings_are_refused_naming_the_setting(section, message):
    with pytest.raises(ConfigError, match=message):
        slurm_settings(section, {})
