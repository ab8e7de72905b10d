import pytest
import torch
import torch.nn.functional as F

from orca_lora.models.heads import HEADS, ClassificationHead, DenseHead, PooledFeatures, build_head


def test_classification_head_is_linear_on_mean_tokens():
    head = ClassificationHead(6, 4, generator=torch.Generator().manual_seed(0))
    tokens = torch.randn(3, 2, 5, 6)
    pooled = tokens.reshape(3, -1, 6).sum(dim=1) / 10
    torch.testing.assert_close(head(tokens), pooled @ head.fc.weight.T + head.fc.bias)
    assert "num_classes=4" in repr(head)


def test_dense_head_places_each_token_on_its_stride_by_stride_patch():
    stride, channels = 4, 2
    head = DenseHead(6, channels, stride, out_size=(12, 8), generator=torch.Generator().manual_seed(0))
    tokens = torch.randn(2, 3, 2, 6)
    field = head(tokens)
    assert field.shape == (2, channels, 12, 8)
    projected = tokens @ head.fc.weight.T + head.fc.bias
    expected = torch.empty(2, channels, 12, 8)
    for i in range(3):
        for j in range(2):
            for c in range(channels):
                for di in range(stride):
                    for dj in range(stride):
                        expected[:, c, i * stride + di, j * stride + dj] = \
                            projected[:, i, j, c * stride * stride + di * stride + dj]
    torch.testing.assert_close(field, expected)


def test_dense_head_resizes_to_the_target_resolution():
    generator_seed = 3
    native = DenseHead(6, 1, 4, out_size=(12, 8), generator=torch.Generator().manual_seed(generator_seed))
    resized = DenseHead(6, 1, 4, out_size=(85, 85), generator=torch.Generator().manual_seed(generator_seed))
    tokens = torch.randn(2, 3, 2, 6)
    expected = F.interpolate(native(tokens), size=(85, 85), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized(tokens), expected)
    assert "stride=4, out_size=(85, 85)" in repr(resized)


def test_registry_builds_each_head_and_rejects_bad_arguments():
    assert set(HEADS) == {"classification", "dense", "pooled"}
    assert isinstance(build_head("classification", 8, 10, 8, None), ClassificationHead)
    assert isinstance(build_head("dense", 8, 1, 8, (20, 20)), DenseHead)
    with pytest.raises(KeyError, match="'classification', 'dense'"):
        build_head("segmentation", 8, 1, 8, None)
    with pytest.raises(ValueError, match="dense head only"):
        build_head("classification", 8, 10, 8, (20, 20))
    with pytest.raises(ValueError, match="needs output_size"):
        build_head("dense", 8, 1, 8, None)
    with pytest.raises(ValueError, match="num_outputs"):
        build_head("classification", 8, 0, 8, None)


def test_pooled_head_is_the_mean_token_and_has_no_parameters():
    tokens = torch.randn(2, 4, 4, 8)
    head = build_head("pooled", 8, 8, 2, None)
    assert isinstance(head, PooledFeatures) and not list(head.parameters())
    assert torch.allclose(head(tokens), tokens.reshape(2, 16, 8).mean(dim=1))
    with pytest.raises(ValueError, match="pooled head outputs the body's 8 pooled features"):
        build_head("pooled", 8, 3, 2, None)
