import torch

from orca_lora.config import SourceConfig
from orca_lora.models.source import load_source_body

TINY_KWARGS = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": [2, 2],
               "num_heads": [2, 4]}


def test_a_random_weight_body_is_the_same_every_time_it_is_built(tmp_path):
    source = SourceConfig(model="swin_tiny_patch4_window7_224", pretrained=False, model_kwargs=TINY_KWARGS)
    torch.manual_seed(1)
    first = load_source_body(source, tmp_path)
    torch.manual_seed(2)  # the global generator does not leak in, and is left as it was
    state = torch.random.get_rng_state()
    second = load_source_body(source, tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in second.parameters()) and not second.training
