"""SBoRA (Po et al. 2024, "SBoRA: Low-Rank Adaptation with Regional Weight Updates"; seed 003):
LoRA with one factor fixed to standard basis vectors, the rows or columns of the identity.

    SBoRA-FA:  dW = s B A_sb,  A_sb = [e_i1 ... e_ir]^T  (r x d_in),   only B (d_out x r) trains
    SBoRA-FB:  dW = s B_sb A,  B_sb = [e_j1 ... e_jr]    (d_out x r),  only A (r x d_in) trains

so dW is zero outside r columns (FA) or r rows (FB): dW[:, i_k] = s B[:, k], resp. dW[j_k, :] = s A[k].
As in the official code (github.com/cityuhkai/SBoRA, tuners/sbora.py) the trained factor starts at
zero, s = alpha / r, and the r indices are distinct and uniformly drawn (its `random.sample`), here
from the layer's torch.Generator so a seed fixes them. The forward picks the r input features
(index_select) or adds into the r output features (index_add) instead of multiplying by a one-hot
matrix. The indices are a buffer (`basis_indices`), so they travel with the model's state dict.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orca_lora.adapters.lora import LoRALinear, register_variant


def standard_basis_indices(size: int, rank: int, generator: torch.Generator | None = None) -> Tensor:
    """`rank` distinct indices of range(size), drawn uniformly without replacement, in draw order."""
    if not 1 <= rank <= size:
        raise ValueError(f"rank must be in [1, size] = [1, {size}] to pick distinct basis vectors, got {rank}")
    return torch.randperm(size, generator=generator)[:rank]


def standard_basis_rows(indices: Tensor, size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[e_i]^T for i in `indices`: the one-hot rows of the size x size identity, shape (len(indices), size)."""
    return F.one_hot(indices, size).to(dtype)


@register_variant("sbora-fa")
class SBoRAFALinear(LoRALinear):
    """SBoRA-FA: h = W0 x + b + s B x[i_1..i_r]; A is fixed to the standard-basis rows, only B trains."""

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float = 16.0,
        use_rslora: bool = False,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base_layer, rank, alpha, use_rslora, dropout, generator)
        del self.lora_A  # fixed to standard-basis rows, which its indices describe; B is LoRA's zeros
        indices = standard_basis_indices(base_layer.in_features, rank, generator)
        self.register_buffer("basis_indices", indices.to(base_layer.weight.device))

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


@register_variant("sbora-fb")
class SBoRAFBLinear(LoRALinear):
    """SBoRA-FB: h = W0 x + b + s B_sb A x; B is fixed to standard-basis columns, only A trains."""

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float = 16.0,
        use_rslora: bool = False,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base_layer, rank, alpha, use_rslora, dropout, generator)
        del self.lora_B  # fixed to standard-basis columns, which its indices describe
        nn.init.zeros_(self.lora_A)  # SBoRA starts the trained factor at zero, so dW = 0 at init
        indices = standard_basis_indices(base_layer.out_features, rank, generator)
        self.register_buffer("basis_indices", indices.to(base_layer.weight.device))

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
