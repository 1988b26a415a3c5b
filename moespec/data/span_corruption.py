"""T5's span-corruption objective (Raffel et al. 2020; Switch Transformer, ST-MoE) on the byte corpus.

An encoder-decoder is not trained on next-token prediction: about `noise_density` of a raw
window is hidden in spans of `mean_span` tokens on average. The encoder sees the window with
each hidden span replaced by one sentinel; the decoder writes, for each span, its sentinel and
then the hidden tokens. T5's inputs 512 / targets 114 come from a raw window of 568.

    raw      "Thank you for inviting me"            (hidden: "for " and "me")
    inputs   "Thank you " <s0> "inviting " <s1> <EOS>
    targets  <s0> "for " <s1> "me" <EOS>

The arithmetic follows `random_spans_helper` and the mask `random_spans_noise_mask` of the T5
codebase, so lengths and span counts agree with the papers' configurations. Python's `round`
is half-to-even, as is `tf.round`, so ties (e.g. 10 * 0.25) round the same way there and here.

Ids: the 256 bytes, then PAD_ID (also the decoder's start token, as in T5) and EOS_ID, then
sentinels from the top of the vocabulary downward (sentinel i is vocab_size - 1 - i, so T5's
extra_id_0 is the last id). Any vocab_size that leaves room for all three groups works.

Shape legend: B rows, R raw window bytes, S encoder inputs (model.encoder.seq_len),
T decoder targets (model.seq_len).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moespec.data.corpus import BYTE_VOCAB, windows_from

PAD_ID = 256
EOS_ID = 257
SPECIAL_TOKENS = 2  # PAD_ID and EOS_ID, right after the bytes
IGNORE_INDEX = -100  # cross_entropy's default ignore_index: padded targets cost nothing


@dataclass(frozen=True)
class SpanBatch:
    inputs_BS: torch.Tensor  # [B, inputs_length] long, PAD_ID after EOS
    decoder_inputs_BT: torch.Tensor  # [B, targets_length] long, targets shifted right, PAD_ID first
    targets_BT: torch.Tensor  # [B, targets_length] long, -100 where padded


def _check_objective(noise_density: float, mean_span: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_span < 1.0:
        raise ValueError(f"mean_span must be >= 1 token, got {mean_span}")


def _noise_counts(raw_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for one window: deterministic, so every row of a batch
    corrupts to the same lengths and the batch needs no per-row bookkeeping."""
    _check_objective(noise_density, mean_span)
    if raw_length < 2:
        raise ValueError(f"raw_length must be >= 2 (one kept and one hidden byte), got {raw_length}")
    num_noise = min(max(round(raw_length * noise_density), 1), raw_length - 1)
    n_spans = max(1, round(num_noise / mean_span))
    return num_noise, n_spans


def corrupted_lengths(raw_length: int, noise_density: float, mean_span: float) -> tuple[int, int, int]:
    """(inputs_length, targets_length, n_spans) that a raw window of raw_length corrupts to,
    each count including its EOS: T5's `random_spans_helper` arithmetic."""
    num_noise, n_spans = _noise_counts(raw_length, noise_density, mean_span)
    inputs_length = raw_length - num_noise + n_spans + 1  # kept bytes, one sentinel per span, EOS
    targets_length = num_noise + n_spans + 1  # one sentinel per span, hidden bytes, EOS
    return inputs_length, targets_length, n_spans


def raw_length_for(inputs_length: int, targets_length: int, noise_density: float, mean_span: float) -> int:
    """The longest raw window whose corruption fits both the encoder and the decoder, so
    neither side pays for padding it could have filled with text (unless the other side
    is the limit: then that one is padded)."""
    need_in, need_tg, _ = corrupted_lengths(2, noise_density, mean_span)
    if inputs_length < need_in:
        raise ValueError(
            f"model.encoder.seq_len ({inputs_length}) is too short for span corruption: "
            f"it needs at least {need_in} (kept bytes, a sentinel and EOS)"
        )
    if targets_length < need_tg:
        raise ValueError(
            f"model.seq_len ({targets_length}) is too short for span-corruption targets: "
            f"it needs at least {need_tg} (a sentinel, the hidden bytes and EOS)"
        )
    # inputs + targets = raw + 2 * spans + 2 > raw, so no raw length from inputs + targets on
    # can fit; scanning down from there, the first fit is the largest, monotone lengths or not.
    for raw in range(inputs_length + targets_length - 1, 2, -1):
        got_in, got_tg, _ = corrupted_lengths(raw, noise_density, mean_span)
        if got_in <= inputs_length and got_tg <= targets_length:
            return raw
    return 2


def min_vocab_size(
    inputs_length: int, targets_length: int, noise_density: float = 0.15, mean_span: float = 3.0
) -> int:
    """The smallest model.vocab_size that holds the bytes, PAD, EOS and every sentinel a
    window of these lengths needs."""
    raw = raw_length_for(inputs_length, targets_length, noise_density, mean_span)
    _, _, n_spans = corrupted_lengths(raw, noise_density, mean_span)
    return BYTE_VOCAB + SPECIAL_TOKENS + n_spans


def _random_segmentation(rows: int, num_items: int, num_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths [rows, num_segments] (each >= 1, summing to num_items) of uniformly random splits:
    the cuts are distinct gaps among the num_items - 1, drawn by sorting random keys (T5 shuffles
    an indicator; the distribution is the same) so that all rows are drawn at once."""
    keys_RG = torch.rand(rows, num_items - 1, generator=generator)  # G = num_items - 1 gaps
    cuts_RC = keys_RG.argsort(dim=1)[:, : num_segments - 1].sort(dim=1).values + 1  # C = segments - 1
    zeros_R1 = torch.zeros(rows, 1, dtype=torch.long)
    ends_R1 = torch.full((rows, 1), num_items, dtype=torch.long)
    return torch.cat([zeros_R1, cuts_RC, ends_R1], dim=1).diff(dim=1)  # [rows, num_segments]


def _noise_masks(rows: int, length: int, noise_density: float, mean_span: float, generator: torch.Generator) -> torch.Tensor:
    """`rows` independent masks, [rows, length] bool; noise_mask is one row of this."""
    num_noise, n_spans = _noise_counts(length, noise_density, mean_span)
    num_kept = length - num_noise
    if num_kept < n_spans:
        raise ValueError(
            f"noise_density {noise_density} with mean_span {mean_span} gives {n_spans} hidden spans "
            f"in {length} tokens but only {num_kept} kept tokens to separate them; "
            f"lower noise_density or raise mean_span"
        )
    noise_RN = _random_segmentation(rows, num_noise, n_spans, generator)  # [rows, N]
    kept_RN = _random_segmentation(rows, num_kept, n_spans, generator)  # [rows, N]
    spans_R2N = torch.stack([kept_RN, noise_RN], dim=2).reshape(rows, 2 * n_spans)  # kept, hidden, ...
    ends_R2N = spans_R2N.cumsum(dim=1)
    pos_RL = torch.arange(length).expand(rows, length).contiguous()
    span_RL = torch.searchsorted(ends_R2N, pos_RL, right=True)  # which span each token is in
    return span_RL % 2 == 1  # [rows, length]


def noise_mask(length: int, noise_density: float, mean_span: float, generator: torch.Generator) -> torch.Tensor:
    """Which of `length` tokens are hidden, [length] bool: T5's `random_spans_noise_mask`.
    Counts are fixed by the length; only where spans fall is random. Starting with kept
    text and ending with a hidden span means targets never end on a dangling sentinel."""
    return _noise_masks(1, length, noise_density, mean_span, generator)[0]


def _replace_spans(tokens_BR: torch.Tensor, drop_BR: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Each run of dropped tokens becomes its sentinel; the rest is kept in order. Applied to
    the noise mask it makes the inputs, to its complement the targets (T5 does the same):
    the k-th kept span precedes the k-th hidden span, so both sides number spans alike."""
    prev_BR = torch.nn.functional.pad(drop_BR[:, :-1], (1, 0), value=False)
    first_BR = drop_BR & ~prev_BR  # first token of each dropped run
    span_BR = first_BR.long().cumsum(dim=1) - 1  # 0-based run number
    with_sentinels_BR = torch.where(first_BR, vocab_size - 1 - span_BR, tokens_BR)
    keep_BR = ~drop_BR | first_BR
    # Every row keeps the same count (the counts are deterministic), so the ragged select is square.
    return with_sentinels_BR[keep_BR].view(tokens_BR.shape[0], -1)  # [B, kept]


def get_span_batch(
    ids: torch.Tensor,
    *,
    batch: int,
    inputs_length: int,
    targets_length: int,
    vocab_size: int,
    generator: torch.Generator,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
) -> SpanBatch:
    """`batch` random windows of `ids`, span-corrupted for an encoder-decoder. The window is
    the longest that fits both lengths (raw_length_for); the generator draws the window
    starts, then each row's mask, so a seed fixes the whole sequence of batches."""
    raw = raw_length_for(inputs_length, targets_length, noise_density, mean_span)
    _, _, n_spans = corrupted_lengths(raw, noise_density, mean_span)
    need_vocab = BYTE_VOCAB + SPECIAL_TOKENS + n_spans
    if vocab_size < need_vocab:
        raise ValueError(
            f"model.vocab_size ({vocab_size}) is too small for span corruption at "
            f"inputs {inputs_length} / targets {targets_length}: it needs at least {need_vocab} "
            f"({BYTE_VOCAB} bytes, PAD and EOS, {n_spans} sentinels)"
        )
    if len(ids) < raw:
        raise ValueError(
            f"corpus part of {len(ids)} tokens is too short for one span-corruption window "
            f"of {raw} raw tokens (inputs {inputs_length}, targets {targets_length})"
        )
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")

    starts_B = torch.randint(0, len(ids) - raw + 1, (batch,), generator=generator)
    raw_BR = windows_from(ids, starts_B, raw)  # [B, R]
    noise_BR = _noise_masks(batch, raw, noise_density, mean_span, generator)  # [B, R]

    kept_BI = _replace_spans(raw_BR, noise_BR, vocab_size)  # [B, I]: I = inputs less EOS
    hidden_BJ = _replace_spans(raw_BR, ~noise_BR, vocab_size)  # [B, J]: J = targets less EOS
    n_in, n_tg = kept_BI.shape[1], hidden_BJ.shape[1]

    inputs_BS = torch.full((batch, inputs_length), PAD_ID, dtype=torch.long)
    inputs_BS[:, :n_in] = kept_BI
    inputs_BS[:, n_in] = EOS_ID
    targets_BT = torch.full((batch, targets_length), IGNORE_INDEX, dtype=torch.long)
    targets_BT[:, :n_tg] = hidden_BJ
    targets_BT[:, n_tg] = EOS_ID

    start_B1 = torch.full((batch, 1), PAD_ID, dtype=torch.long)  # T5 starts decoding from PAD
    decoder_inputs_BT = torch.cat([start_B1, targets_BT[:, :-1]], dim=1)  # [B, T]
    decoder_inputs_BT = decoder_inputs_BT.masked_fill(decoder_inputs_BT == IGNORE_INDEX, PAD_ID)
    return SpanBatch(inputs_BS=inputs_BS, decoder_inputs_BT=decoder_inputs_BT, targets_BT=targets_BT)
