"""Shazeer et al. 2017's host: MoE layers between stacked LSTM layers (their language models
put one between two LSTMs), so the paper's own system can be written as a spec.

Why a hand-written recurrence and not nn.LSTM: the input projection of every time step is
one matmul ([B*S, D] x [D, 4D]) and the recurrent one a matmul per step, so FlopCounterMode
sees exactly what sim/counts.py counts: the first step's recurrent product is skipped (its
state is zero; its bias is still added), which makes the recurrent FLOPs 6*(S-1)*B*D*4D,
with nothing discounted for a zero state. Parameters are nn.LSTM's: weight_ih and weight_hh
[4D, D] and both biases [4D] per layer. Gates in torch's order: input, forget, cell, output.

A block is one LSTM layer, then (when moe.placement names it) a MoE layer with a residual
connection: x + MoE(x). No norms, no attention, no positions: order is in the recurrence.
Shape legend: B batch, S sequence, D d_model (the LSTM's units), V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moespec.model.layers import run_blocks
from moespec.model.regions import region
from moespec.model.types import ModelAux


class LSTMLayer(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.ih = nn.Linear(d_model, 4 * d_model)  # weight_ih, bias_ih
        self.hh = nn.Linear(d_model, 4 * d_model)  # weight_hh, bias_hh

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        gates_x_BSG = self.ih(x_BSD)  # [B, S, 4D]: every step's input projection at once
        c_BD = torch.zeros(B, D, dtype=gates_x_BSG.dtype, device=x_BSD.device)
        outputs = []
        for t in range(S):
            gates_BG = gates_x_BSG[:, t] + (self.hh(outputs[-1]) if t else self.hh.bias)  # h_0 = 0: its product is zero
            i, f, g, o = gates_BG.float().chunk(4, dim=-1)
            c_BD = torch.sigmoid(f) * c_BD.float() + torch.sigmoid(i) * torch.tanh(g)
            outputs.append((torch.sigmoid(o) * torch.tanh(c_BD)).to(gates_x_BSG.dtype))
        return torch.stack(outputs, dim=1)  # [B, S, D]


class LSTMBlock(nn.Module):
    """An LSTM layer, then optionally a MoE layer with a residual connection."""

    def __init__(self, *, lstm: LSTMLayer, moe: nn.Module | None, dropout: float = 0.0):
        super().__init__()
        self.lstm, self.moe = lstm, moe
        self.dropout = nn.Dropout(dropout)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def forward(self, x_BSD: torch.Tensor, *, token_ids: torch.Tensor | None = None):
        with region("attention"):  # the recurrence stands where attention does in a transformer
            x_BSD = self.dropout(self.lstm(x_BSD))
        if self.moe is None:
            return x_BSD, None, None
        y_BSD, stats, aux_loss = self.moe(x_BSD, token_ids=token_ids)
        return x_BSD + self.dropout(y_BSD), stats, aux_loss


class LSTMLanguageModel(nn.Module):
    """Embedding, LSTM blocks, softmax layer (tied: the embedding)."""

    def __init__(self, *, tok_embeddings: nn.Embedding, blocks: list[LSTMBlock], lm_head: nn.Linear | None, dropout: float = 0.0):
        super().__init__()
        self.tok_embeddings = tok_embeddings
        self.blocks = nn.ModuleList(blocks)
        self.lm_head = lm_head
        self.embed_dropout = nn.Dropout(dropout)
        self.pos_embeddings = self.head_bias = None
        self.final_norm = None  # counted like a transformer's: nothing here

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head is None

    @property
    def max_seq_len(self) -> int | None:
        return None

    def forward(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, ModelAux]:
        x_BSD = self.embed_dropout(self.tok_embeddings(tokens_BS))
        aux = torch.zeros((), dtype=torch.float32, device=tokens_BS.device)
        stats = []
        x_BSD, aux = run_blocks(self.blocks, x_BSD, stats, aux, token_ids=tokens_BS)
        logits_BSV = F.linear(x_BSD, self.tok_embeddings.weight) if self.lm_head is None else self.lm_head(x_BSD)
        return logits_BSV, ModelAux(aux_loss=aux, moe=stats)


def assemble_lstm(plan, moe_builder) -> LSTMLanguageModel:
    m = plan.model
    blocks = [LSTMBlock(lstm=LSTMLayer(m.d_model), moe=moe_builder(layer) if layer.moe is not None else None, dropout=m.dropout)
              for layer in plan.layers]  # fmt: skip
    return LSTMLanguageModel(tok_embeddings=nn.Embedding(m.vocab_size, m.d_model), blocks=blocks,
                             lm_head=None if m.tied_embeddings else nn.Linear(m.d_model, m.vocab_size, bias=False), dropout=m.dropout)  # fmt: skip
