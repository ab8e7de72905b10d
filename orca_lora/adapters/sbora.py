"""SBoRA (Po et al. 2024, "SBoRA: Low-Rank Adaptation with Regional Weight Updates"), and the
`sbora-fa` / `sbora-fb` method specs: LoRA with one factor fixed to standard basis vectors, the rows
or columns of the identity.

    SBoRA-FA:  dW = s B A_sb,  A_sb = [e_i1 ... e_ir]^T  (r x d_in),   only B (d_out x r) trains
    SBoRA-FB:  dW = s B_sb A,  B_sb = [e_j1 ... e_jr]    (d_out x r),  only A (r x d_in) trains

so dW is zero outside r columns (FA) or r rows (FB): dW[:, i_k] = s B[:, k], resp. dW[j_k, :] = s A[k].
As in the official code (github.com/cityuhkai/SBoRA, tuners/sbora.py) the trained factor starts at
zero, s = alpha / r, and the r indices are distinct and uniformly drawn (its `random.sample`), here
from the layer's torch.Generator so a seed fixes them. The forward picks the r input features
(index_select) or adds into the r output features (index_add) instead of multiplying by a one-hot
matrix. The indices are a buffer (`basis_indices`), so they travel with the model's state dict.
Both merge into W0 like LoRA; neither has a PEFT layout nor a weight-change rule for `analyze`.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orca_lora.adapters.base import AdapterLayer, kaiming_lora_A
from orca_lora.adapters.inject import LinearAdapterMethod
from orca_lora.adapters.spec import register_method


def standard_basis_indices(size: int, rank: int, generator: torch.Generator | None = None) -> Tensor:
    """`rank` distinct indices of range(size), drawn uniformly without replacement, in draw order."""
    if not 1 <= rank <= size:
        raise ValueError(f"rank must be in [1, size] = [1, {size}] to pick distinct basis vectors, got {rank}")
    return torch.randperm(size, generator=generator)[:rank]


def standard_basis_rows(indices: Tensor, size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[e_i]^T for i in `indices`: the one-hot rows of the size x size identity, shape (len(indices), size)."""
    return F.one_hot(indices, size).to(dtype)


class SBoRALinear(AdapterLayer):
    """The part SBoRA-FA and -FB share: `rank` distinct basis indices into the `basis_side` of W0
    (in_features for FA, out_features for FB) and one zero-initialised trained factor."""

    basis_side: str
    trained_shape: tuple[int, int]

    def init_adapter(self, generator: torch.Generator | None) -> None:
        # The indices come after an r x d_in draw of LoRA's A, as when these layers were LoRALinears,
        # so a seed keeps picking the indices (and runs) it picked before.
        kaiming_lora_A(self.base_layer, self.rank, generator)
        [trained] = self.adapter_parameter_names
        setattr(self, trained, nn.Parameter(self.base_layer.weight.new_zeros(self.trained_shape)))
        indices = standard_basis_indices(getattr(self.base_layer, self.basis_side), self.rank, generator)
        self.register_buffer("basis_indices", indices.to(self.base_layer.weight.device))


class SBoRAFALinear(SBoRALinear):
    """SBoRA-FA: h = W0 x + b + s B x[i_1..i_r]; A is fixed to the standard-basis rows, only B trains."""

    method, basis_side = "sbora-fa", "in_features"
    adapter_parameter_names = ("lora_B",)

    @property
    def trained_shape(self) -> tuple[int, int]:
        return self.base_layer.out_features, self.rank

    @property
    def trainable_param_count(self) -> int:
        return self.base_layer.out_features * self.rank

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(A_sb, B, s) of the equivalent LoRA, A_sb dense one-hot (for checks and export, not forward)."""
        lora_B = self.lora_B
        basis = standard_basis_rows(self.basis_indices, self.base_layer.in_features, lora_B.dtype)
        return basis, lora_B, self.scaling

    def delta_weight(self) -> Tensor:
        """dW: s B in the columns i_1..i_r, zero elsewhere."""
        zeros = torch.zeros_like(self.base_layer.weight)
        return zeros.index_copy(1, self.basis_indices, self.scaling * self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        x_lora = self.adapter_input(x)
        base = self.base_layer(x)
        selected = x_lora.index_select(-1, self.basis_indices)
        out = torch.addmm(
            base.reshape(-1, base.shape[-1]), selected.reshape(-1, self.rank), self.lora_B.t(), alpha=self.scaling
        )
        return out.view(base.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fixed=A (standard basis, {self.rank} input features)"


class SBoRAFBLinear(SBoRALinear):
    """SBoRA-FB: h = W0 x + b + s B_sb A x; B is fixed to standard-basis columns, only A trains."""

    method, basis_side = "sbora-fb", "out_features"
    adapter_parameter_names = ("lora_A",)

    @property
    def trained_shape(self) -> tuple[int, int]:
        return self.rank, self.base_layer.in_features

    @property
    def trainable_param_count(self) -> int:
        return self.rank * self.base_layer.in_features

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(A, B_sb, s) of the equivalent LoRA, B_sb dense one-hot (for checks and export, not forward)."""
        lora_A = self.lora_A
        basis = standard_basis_rows(self.basis_indices, self.base_layer.out_features, lora_A.dtype).t()
        return lora_A, basis, self.scaling

    def delta_weight(self) -> Tensor:
        """dW: s A in the rows j_1..j_r, zero elsewhere."""
        zeros = torch.zeros_like(self.base_layer.weight)
        return zeros.index_copy(0, self.basis_indices, self.scaling * self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        x_lora = self.adapter_input(x)
        hidden = F.linear(x_lora, self.lora_A)
        return self.base_layer(x).index_add(-1, self.basis_indices, hidden, alpha=self.scaling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fixed=B (standard basis, {self.rank} output features)"


@register_method
class SBoRAFA(LinearAdapterMethod):
    name, layer = "sbora-fa", SBoRAFALinear
    mergeable = True


@register_method
class SBoRAFB(LinearAdapterMethod):
    name, layer = "sbora-fb", SBoRAFBLinear
    mergeable = True
