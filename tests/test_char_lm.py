"""The character LM's data, metrics and training, cheaply: nothing here trains the full model."""
import pytest
import torch
import torch.nn.functional as F
from edgepasses.zoo import char_lm
from edgepasses.zoo.char_lm import (
    SEQ_LEN,
    VOCAB_SIZE,
    CharTransformer,
    calibration_batches,
    decode,
    documentation_text,
    encode,
    eval_batches,
    heldout_ids,
    next_char_accuracy,
    perplexity,
    train,
    train_ids,
)


def _tiny_model() -> CharTransformer:
    return CharTransformer(d_model=32, nhead=2, dim_feedforward=64, num_layers=1)


def test_text_is_the_sorted_topics_with_whitespace_normalised():
    from pydoc_data.topics import topics

    text = documentation_text()
    assert len(text) > 400_000
    assert "\n" not in text and "\t" not in text and "  " not in text
    first = min(topics)
    assert text.startswith(" ".join(topics[first].split())[:200])


def test_vocabulary_is_fixed_printable_ascii():
    assert VOCAB_SIZE == 96
    assert encode(" A~").tolist() == [1, 34, 95]
    assert encode("é\n").tolist() == [0, 0]  # anything else is the unknown id
    assert decode(encode("print('hi') # ok")) == "print('hi') # ok"


def test_split_is_a_contiguous_ninety_ten_cut():
    train_part, heldout = train_ids(), heldout_ids()
    assert torch.equal(torch.cat([train_part, heldout]), encode(documentation_text()))
    assert len(train_part) == int(0.9 * (len(train_part) + len(heldout)))


def test_windows_are_deterministic_and_targets_are_the_next_characters():
    calibration = calibration_batches(3, 4)
    assert len(calibration) == 3 and calibration[0][0].shape == (4, SEQ_LEN)
    assert torch.equal(calibration[0][0][0], train_ids()[:SEQ_LEN])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(calibration, calibration_batches(3, 4)))

    (inputs, targets), = eval_batches(batch_size=4, count=1)
    assert inputs.shape == targets.shape == (4, SEQ_LEN) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(inputs[0], heldout_ids()[:SEQ_LEN])
    assert len(eval_batches(batch_size=8)) == (len(heldout_ids()) - 1) // SEQ_LEN // 8
    with pytest.raises(ValueError, match="characters"):
        eval_batches(batch_size=8, count=10_000)


def test_uniform_logits_score_the_vocabulary_size():
    def uniform(token_ids):
        return torch.zeros(*token_ids.shape, VOCAB_SIZE)

    assert perplexity(uniform, batch_size=4, batches=3) == pytest.approx(VOCAB_SIZE, rel=1e-5)


def test_accuracy_of_always_space_is_the_share_of_spaces():
    space = encode(" ").item()

    def always_space(token_ids):
        return F.one_hot(torch.full_like(token_ids, space), VOCAB_SIZE).float()

    targets = torch.cat([t.flatten() for _, t in eval_batches(batch_size=4, count=3)])
    expected = 100.0 * float((targets == space).float().mean())
    assert next_char_accuracy(always_space, batch_size=4, batches=3) == pytest.approx(expected)


def test_model_is_causal():
    model = _tiny_model().eval()
    token_ids = calibration_batches(1, 2)[0][0]
    changed = token_ids.clone()
    changed[:, 40:] = 1
    with torch.no_grad():
        logits, logits_changed = model(token_ids), model(changed)
    assert logits.shape == (2, SEQ_LEN, VOCAB_SIZE)
    torch.testing.assert_close(logits[:, :40], logits_changed[:, :40])
    assert not torch.allclose(logits[:, 40:], logits_changed[:, 40:])


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = _tiny_model()
    inputs, targets = eval_batches(batch_size=8, count=1)[0]

    def loss():
        with torch.no_grad():
            return float(F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()))

    before = loss()
    assert model is train(model, steps=30, batch_size=8, lr=1e-2)
    assert not model.training
    assert loss() < before - 1.0


def test_load_or_train_caches_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPASSES_CACHE", str(tmp_path))
    monkeypatch.setattr(char_lm, "TRAIN_STEPS", 1)
    rng_state = torch.random.get_rng_state()
    trained = char_lm.load_or_train_char_lm()
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG is left alone
    assert [p.name for p in tmp_path.iterdir()] == [f"char_lm_{char_lm.CACHE_VERSION}.pt"]
    loaded = char_lm.load_or_train_char_lm()
    assert not loaded.training
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
