"""A gated recurrent unit written from its gate equations, laid out like torch.nn.GRU (derived in chapter 3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmlite.checks import check_dropout, check_mask, check_tensor


def gru_cell(
    gi: Tensor, h: Tensor, weight_hh: Tensor, bias_hh: Tensor | None
) -> Tensor:
    """One GRU step, given the input projection gi = W_i x + b_i, stacked in torch's (r, z, n) order.

    r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

    gi: (B, 3H); h: (B, H); weight_hh: (3H, H); bias_hh: (3H,) or None. Returns h': (B, H).
    """
    gh = F.linear(h, weight_hh, bias_hh)  # (B, 3H)
    i_r, i_z, i_n = gi.chunk(3, dim=-1)  # each (B, H)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)  # each (B, H)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1.0 - z) * n + z * h


class GRU(nn.Module):
    """Multi-layer GRU with torch.nn.GRU's parameter names, so `copy_from_torch` (or load_state_dict) works.

    The input projections of a layer are one matmul over all time steps; only the recurrence loops.
    With a mask (True = real step) the state does not update at masked steps, so for right padding
    h_n is the state at each row's last real token, as with pack_padded_sequence; `out` is zero there.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"input_size, hidden_size and num_layers must be positive, got "
                f"{input_size}, {hidden_size}, {num_layers}"
            )
        check_dropout(dropout)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = dropout  # applied to each layer's output except the last, as in nn.GRU
        for layer in range(num_layers):
            d_in = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(3 * hidden_size, d_in)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(3 * hidden_size, hidden_size)))
            if bias:
                self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(3 * hidden_size)))
                self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(3 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _layer_params(self, layer: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(weight_ih, weight_hh, bias_ih, bias_hh) of one layer."""
        b_ih = getattr(self, f"bias_ih_l{layer}") if self.bias else None
        b_hh = getattr(self, f"bias_hh_l{layer}") if self.bias else None
        return getattr(self, f"weight_ih_l{layer}"), getattr(self, f"weight_hh_l{layer}"), b_ih, b_hh

    @torch.no_grad()
    def copy_from_torch(self, gru: nn.GRU) -> "GRU":
        """Copy the weights of a unidirectional torch.nn.GRU with the same sizes; returns self."""
        if not isinstance(gru, nn.GRU):
            raise TypeError(f"gru must be a torch.nn.GRU, got {type(gru).__name__}")
        theirs = (gru.input_size, gru.hidden_size, gru.num_layers, gru.bias, gru.bidirectional)
        ours = (self.input_size, self.hidden_size, self.num_layers, self.bias, False)
        if theirs != ours:
            raise ValueError(
                f"gru (input_size, hidden_size, num_layers, bias, bidirectional) = {theirs} "
                f"but this module was built for {ours}"
            )
        self.load_state_dict(gru.state_dict())
        return self

    def _check_inputs(self, x: Tensor, h0: Tensor | None, mask: Tensor | None) -> None:
        """Raise with the offending argument and dimension when the inputs do not fit."""
        for name, t in (("x", x), ("h0", h0), ("mask", mask)):
            if t is not None:
                check_tensor(name, t)
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D (B, T, input_size) with batch_first, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"x last dim is {x.shape[-1]} but the module was built for input_size={self.input_size}"
            )
        b, t = x.shape[0], x.shape[1]
        if h0 is not None and h0.shape != (self.num_layers, b, self.hidden_size):
            raise ValueError(
                f"h0 shape {tuple(h0.shape)} should be (num_layers, B, hidden_size) = "
                f"{(self.num_layers, b, self.hidden_size)}"
            )
        check_mask("mask", mask, (b, t))

    def forward(
        self, x: Tensor, h0: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x: (B, T, I) (or (T, B, I) if not batch_first); h0: (L, B, H); mask: (B, T) bool, True = real.

        Returns out: (B, T, H) (the last layer's states, zero at masked steps) and h_n: (L, B, H).
        An empty sequence (T = 0) gives out (B, 0, H) and h_n = h0.
        """
        check_tensor("x", x)
        if not self.batch_first and x.dim() == 3:
            x = x.transpose(0, 1)  # (B, T, I)
        self._check_inputs(x, h0, mask)
        b, t = x.shape[0], x.shape[1]
        if h0 is None:
            h0 = x.new_zeros(self.num_layers, b, self.hidden_size)
        step_mask = None if mask is None else mask.unsqueeze(-1)  # (B, T, 1)
        layer_input = x
        finals = []
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self._layer_params(layer)
            gi_all = F.linear(layer_input, w_ih, b_ih)  # (B, T, 3H): all time steps in one matmul
            h = h0[layer]  # (B, H)
            outs = []
            for step in range(t):
                h_new = gru_cell(gi_all[:, step], h, w_hh, b_hh)  # (B, H)
                if step_mask is None:
                    h = h_new
                    outs.append(h_new)
                else:
                    m = step_mask[:, step]  # (B, 1)
                    h = torch.where(m, h_new, h)  # padding keeps the previous state
                    outs.append(h_new * m.to(h_new.dtype))  # padding outputs are zero
            finals.append(h)
            layer_input = torch.stack(outs, dim=1) if outs else gi_all.new_zeros(b, 0, self.hidden_size)  # (B, T, H)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        out = layer_input if self.batch_first else layer_input.transpose(0, 1)  # (B, T, H) or (T, B, H)
        return out, torch.stack(finals, dim=0)  # h_n: (L, B, H)
