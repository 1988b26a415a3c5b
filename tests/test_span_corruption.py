"""T5 span corruption on the byte corpus: lengths as T5 computes them, masks with the exact noise
count and span count, batches that decode back to the raw window, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from moespec.data.corpus import BYTE_VOCAB, load_corpus_bytes, load_split
from moespec.data.span_corruption import (
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    corrupted_lengths,
    get_span_batch,
    min_vocab_size,
    noise_mask,
    raw_length_for,
)

FIRST_SENTINEL_FLOOR = BYTE_VOCAB + SPECIAL_TOKENS  # ids from here up are sentinels


@pytest.fixture(scope="module")
def train_ids() -> torch.Tensor:
    return load_split().train


def batch_of(ids, *, seed=0, batch=4, inputs_length=512, targets_length=114, vocab_size=300, **kw):
    gen = torch.Generator().manual_seed(seed)
    return get_span_batch(
        ids, batch=batch, inputs_length=inputs_length, targets_length=targets_length,
        vocab_size=vocab_size, generator=gen, **kw,
    )


def reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    """The raw window, from the inputs with each sentinel replaced by its span in the targets."""
    real = [t for t in targets if t != -100]
    assert real[-1] == EOS_ID and EOS_ID not in real[:-1]
    spans: dict[int, list[int]] = {}
    for tok in real[:-1]:
        if tok >= FIRST_SENTINEL_FLOOR:
            spans[tok] = []
            current = tok
        else:
            assert tok < BYTE_VOCAB
            spans[current].append(tok)
    out: list[int] = []
    for tok in inputs[: inputs.index(EOS_ID)]:
        assert tok < BYTE_VOCAB or tok >= FIRST_SENTINEL_FLOOR  # no PAD before EOS
        out.extend(spans.pop(tok) if tok >= FIRST_SENTINEL_FLOOR else [tok])
    assert not spans, "a target span has no sentinel in the inputs"
    return out


def count_spans(mask: torch.Tensor) -> int:
    return int(mask[0]) + int((mask[1:] & ~mask[:-1]).sum())


def test_lengths_follow_t5_arithmetic():
    # 568 * 0.15 = 85.2 -> 85 noise; 85 / 3 = 28.3 -> 28 spans;
    # inputs 568 - 85 + 28 + 1 = 512, targets 85 + 28 + 1 = 114 (T5's 512/114 pairing)
    assert corrupted_lengths(568, 0.15, 3.0) == (512, 114, 28)
    assert raw_length_for(512, 114, 0.15, 3.0) == 568
    # 10 * 0.25 = 2.5 rounds half to even (tf.round) -> 2 noise, 1 span: inputs 10, targets 4
    assert corrupted_lengths(10, 0.25, 3.0) == (10, 4, 1)
    # 3 * 0.15 = 0.45 -> 0, clipped up to 1 noise token: inputs 3 - 1 + 1 + 1, targets 1 + 1 + 1
    assert corrupted_lengths(3, 0.15, 3.0) == (4, 3, 1)
    # 20 * 0.9 = 18 noise (under the raw - 1 = 19 cap), 18 / 3 = 6 spans
    assert corrupted_lengths(20, 0.9, 3.0) == (20 - 18 + 6 + 1, 18 + 6 + 1, 6)
    # 2 * 0.9 = 1.8 -> 2, clipped down to raw - 1 = 1 so one byte stays visible
    assert corrupted_lengths(2, 0.9, 3.0) == (3, 3, 1)


@pytest.mark.parametrize(
    "inputs_length, targets_length, density, mean",
    [(512, 114, 0.15, 3.0), (512, 128, 0.15, 3.0), (512, 16, 0.15, 3.0), (64, 64, 0.5, 2.0), (3, 3, 0.15, 3.0)],
)
def test_raw_length_is_the_largest_that_fits_both(inputs_length, targets_length, density, mean):
    raw = raw_length_for(inputs_length, targets_length, density, mean)

    def fits(r):
        got_in, got_tg, _ = corrupted_lengths(r, density, mean)
        return got_in <= inputs_length and got_tg <= targets_length

    assert fits(raw)
    assert not any(fits(r) for r in range(raw + 1, 2 * (inputs_length + targets_length)))


def test_targets_can_limit_the_window():
    raw = raw_length_for(512, 16, 0.15, 3.0)
    got_in, got_tg, _ = corrupted_lengths(raw, 0.15, 3.0)
    assert got_tg <= 16 and got_in < 512  # the encoder side is padded, not overfilled


def test_min_vocab_size_counts_bytes_specials_and_sentinels():
    assert min_vocab_size(512, 114) == 256 + 2 + 28


@pytest.mark.parametrize("length, density, mean", [(568, 0.15, 3.0), (100, 0.3, 5.0), (17, 0.5, 1.0), (2, 0.15, 3.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_mask_has_exact_noise_count_and_spans(length, density, mean, seed):
    _, _, n_spans = corrupted_lengths(length, density, mean)
    num_noise = min(max(round(length * density), 1), length - 1)
    mask = noise_mask(length, density, mean, torch.Generator().manual_seed(seed))
    assert mask.shape == (length,) and mask.dtype == torch.bool
    assert int(mask.sum()) == num_noise
    assert count_spans(mask) == n_spans
    assert not mask[0] and mask[-1]  # starts with kept text, ends with a hidden span


def test_noise_mask_places_spans_at_random():
    masks = {tuple(noise_mask(100, 0.15, 3.0, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(masks) == 20
    lengths = set()
    for m in masks:
        run = 0
        for hidden in m:
            if hidden:
                run += 1
            elif run:
                lengths.add(run)
                run = 0
        lengths.add(run)
    assert len(lengths) > 2  # span lengths vary around the mean, not all equal to 3


def test_noise_mask_refuses_spans_that_cannot_be_separated():
    with pytest.raises(ValueError, match="lower noise_density or raise mean_span"):
        noise_mask(3, 0.5, 1.0, torch.Generator().manual_seed(0))


def test_batch_decodes_back_to_a_window_of_the_corpus(train_ids):
    corpus = load_corpus_bytes()
    raw = raw_length_for(512, 114, 0.15, 3.0)
    b = batch_of(train_ids, batch=8)
    for inputs, targets in zip(b.inputs_BS.tolist(), b.targets_BT.tolist()):
        window = reconstruct(inputs, targets)
        assert len(window) == raw
        assert bytes(window) in corpus


def test_batch_decodes_to_contiguous_bytes_with_mean_span_one():
    ids = torch.arange(5000) % 256  # any contiguous window counts up by one, mod 256
    raw = raw_length_for(64, 48, 0.4, 1.0)
    b = batch_of(ids, batch=6, inputs_length=64, targets_length=48, noise_density=0.4, mean_span=1.0)
    for inputs, targets in zip(b.inputs_BS.tolist(), b.targets_BT.tolist()):
        window = reconstruct(inputs, targets)
        assert len(window) == raw
        assert all((b_ - a) % 256 == 1 for a, b_ in zip(window, window[1:]))


def test_sentinels_descend_from_the_top_of_the_vocabulary(train_ids):
    b = batch_of(train_ids, vocab_size=1000)
    expected = list(range(999, 999 - 28, -1))  # 28 spans for 512/114
    for inputs, targets in zip(b.inputs_BS.tolist(), b.targets_BT.tolist()):
        assert [t for t in inputs if t >= FIRST_SENTINEL_FLOOR] == expected
        assert [t for t in targets if t >= FIRST_SENTINEL_FLOOR] == expected
        assert targets[0] == 999  # targets open with the first span's sentinel


def test_exact_fit_has_no_padding(train_ids):
    b = batch_of(train_ids)
    assert b.inputs_BS.shape == (4, 512) and b.targets_BT.shape == (4, 114)
    assert b.inputs_BS.dtype == b.targets_BT.dtype == b.decoder_inputs_BT.dtype == torch.long
    assert (b.inputs_BS[:, -1] == EOS_ID).all() and (b.targets_BT[:, -1] == EOS_ID).all()
    assert not (b.inputs_BS == PAD_ID).any() and not (b.targets_BT == -100).any()


def test_padding_follows_eos(train_ids):
    # targets 128 > 114 needed: 14 ignored positions; targets 16 limits the window: inputs padded
    for targets_length in (128, 16):
        b = batch_of(train_ids, targets_length=targets_length)
        got_in, got_tg, _ = corrupted_lengths(raw_length_for(512, targets_length, 0.15, 3.0), 0.15, 3.0)
        assert (b.inputs_BS[:, got_in - 1] == EOS_ID).all()
        assert (b.inputs_BS[:, got_in:] == PAD_ID).all()
        assert not (b.inputs_BS[:, : got_in - 1] == EOS_ID).any()
        assert not (b.inputs_BS[:, : got_in - 1] == PAD_ID).any()
        assert (b.targets_BT[:, got_tg - 1] == EOS_ID).all()
        assert (b.targets_BT[:, got_tg:] == -100).all()
        assert not (b.targets_BT[:, : got_tg - 1] < 0).any()
    assert got_in < 512 and got_tg == 16


def test_decoder_inputs_are_targets_shifted_right_from_pad(train_ids):
    b = batch_of(train_ids, targets_length=128)
    assert (b.decoder_inputs_BT[:, 0] == PAD_ID).all()
    shifted = b.targets_BT[:, :-1].masked_fill(b.targets_BT[:, :-1] == -100, PAD_ID)
    assert torch.equal(b.decoder_inputs_BT[:, 1:], shifted)
    assert not (b.decoder_inputs_BT < 0).any()  # embedding lookups need real ids


def test_same_seed_same_batch_other_seed_other_batch(train_ids):
    a, again, other = batch_of(train_ids, seed=7), batch_of(train_ids, seed=7), batch_of(train_ids, seed=8)
    for field in ("inputs_BS", "decoder_inputs_BT", "targets_BT"):
        assert torch.equal(getattr(a, field), getattr(again, field))
    assert not torch.equal(a.inputs_BS, other.inputs_BS)
    assert not torch.equal(a.targets_BT[0], a.targets_BT[1])  # rows are drawn independently


def test_too_small_vocab_names_the_key_and_minimum(train_ids):
    with pytest.raises(ValueError, match=r"model\.vocab_size \(285\).*at least 286"):
        batch_of(train_ids, vocab_size=285)
    batch_of(train_ids, vocab_size=286)  # the minimum itself works


def test_too_short_targets_names_the_key_and_minimum(train_ids):
    with pytest.raises(ValueError, match=r"model\.seq_len \(2\).*at least 3"):
        raw_length_for(512, 2, 0.15, 3.0)
    with pytest.raises(ValueError, match=r"model\.seq_len \(2\)"):
        batch_of(train_ids, targets_length=2)


def test_too_short_inputs_names_the_encoder_key():
    with pytest.raises(ValueError, match=r"model\.encoder\.seq_len \(2\).*at least 3"):
        raw_length_for(2, 114, 0.15, 3.0)


def test_too_short_corpus_names_the_window():
    ids = torch.arange(567) % 256  # one byte short of the 568-byte window for 512/114
    with pytest.raises(ValueError, match=r"567 tokens is too short .* 568 raw tokens"):
        batch_of(ids)
    b = batch_of(torch.arange(568) % 256)  # exactly one window fits
    assert reconstruct(b.inputs_BS[0].tolist(), b.targets_BT[0].tolist()) == list(range(256)) * 2 + list(range(56))
