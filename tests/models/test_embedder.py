import pytest
import torch
import torch.nn.functional as F

from orca_lora.models.embedder import EMBEDDER_INITS, Embedder, mean_pool


def reference_embedding(images: torch.Tensor, embedder: Embedder) -> torch.Tensor:
    """Patchify by reshaping, one matmul per patch, then the LayerNorm formula (x - mu) / sqrt(var + eps)."""
    batch, channels, height, width = images.shape
    patch = embedder.patch_size
    patches = images.reshape(batch, channels, height // patch, patch, width // patch, patch)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, height // patch, width // patch, -1)
    weight = embedder.proj.weight.reshape(embedder.proj.out_channels, -1)
    tokens = patches @ weight.T + embedder.proj.bias
    mean = tokens.mean(dim=-1, keepdim=True)
    variance = tokens.var(dim=-1, unbiased=False, keepdim=True)
    normed = (tokens - mean) / torch.sqrt(variance + embedder.norm.eps)
    return normed * embedder.norm.weight + embedder.norm.bias


def test_embedder_matches_patchify_reference_at_body_size(tiny_body):
    embedder = Embedder.from_body(tiny_body, in_channels=5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embedder.norm.weight.uniform_(0.5, 1.5)
        embedder.norm.bias.uniform_(-0.5, 0.5)
    images = torch.rand(2, 5, 32, 32)
    tokens = embedder(images)
    assert tokens.shape == (2, 16, 16, 24)
    torch.testing.assert_close(tokens, reference_embedding(images, embedder), rtol=1e-5, atol=1e-5)


def test_embedder_resizes_other_sizes_bilinearly(tiny_body):
    embedder = Embedder.from_body(tiny_body, in_channels=3, generator=torch.Generator().manual_seed(0))
    fields = torch.rand(2, 3, 85, 85)
    resized = F.interpolate(fields, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(embedder(fields), embedder(resized))
    torch.testing.assert_close(embedder(fields), reference_embedding(resized, embedder), rtol=1e-5, atol=1e-5)


def test_source_init_reproduces_the_body_patch_embedding_exactly(tiny_body):
    with torch.no_grad():
        tiny_body.patch_embed.norm.weight.uniform_(0.5, 1.5)
    embedder = Embedder.from_body(tiny_body, in_channels=3, init="source")
    images = torch.rand(4, 3, 32, 32)
    assert torch.equal(embedder(images), tiny_body.patch_embed(images))
    assert embedder.proj.weight.data_ptr() != tiny_body.patch_embed.proj.weight.data_ptr()


@pytest.mark.parametrize("copies, channels", [(1, 1), (2, 6)])
def test_source_init_for_other_channel_counts_embeds_an_image_as_the_body_embeds_its_rgb(tiny_body, copies, channels):
    """timm's adaptation, checked against the body itself: a grey image embeds as its RGB copy does (weights
    summed over channels); two stacked copies of an RGB image as the image (weights repeated, halved)."""
    with torch.no_grad():
        tiny_body.patch_embed.norm.weight.uniform_(0.5, 1.5)
    embedder = Embedder.from_body(tiny_body, in_channels=channels, init="source")
    images = torch.rand(4, 3 if copies > 1 else 1, 32, 32)
    target_inputs = images.repeat(1, copies, 1, 1)
    rgb = images.expand(-1, 3, -1, -1) if copies == 1 else images
    torch.testing.assert_close(embedder(target_inputs), tiny_body.patch_embed(rgb), rtol=1e-5, atol=1e-5)


def test_unknown_init_lists_the_choices(tiny_body):
    with pytest.raises(ValueError, match="'random', 'source'"):
        Embedder.from_body(tiny_body, in_channels=3, init="xavier")
    assert set(EMBEDDER_INITS) == {"random", "source"}


def test_random_init_is_fixed_by_the_generator(tiny_body):
    def weights(seed: int) -> torch.Tensor:
        return Embedder.from_body(tiny_body, 3, generator=torch.Generator().manual_seed(seed)).proj.weight

    assert torch.equal(weights(1), weights(1))
    assert not torch.equal(weights(1), weights(2))
    bound = 1 / (3 * 2 * 2) ** 0.5  # kaiming-uniform with a = sqrt(5) on fan_in = C * k * k
    assert weights(1).abs().max() <= bound


def test_embedder_rejects_wrong_channels_and_sizes(tiny_body):
    embedder = Embedder.from_body(tiny_body, in_channels=3)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        embedder(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple of patch_size 4"):
        Embedder(3, 8, patch_size=4, img_size=(30, 32))
    assert "img_size=(32, 32), patch_size=2" in repr(embedder)


def test_mean_pool_is_the_mean_over_tokens():
    tokens = torch.randn(2, 3, 4, 5)
    expected = torch.stack([sum(tokens[b, i, j] for i in range(3) for j in range(4)) / 12 for b in range(2)])
    torch.testing.assert_close(mean_pool(tokens), expected)
    with pytest.raises(ValueError, match="NHWC"):
        mean_pool(torch.randn(2, 12, 5))
