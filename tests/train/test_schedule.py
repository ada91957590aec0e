from biomedgpt.train.schedule import warmup_linear_decay


def test_warmup_then_linear_decay_to_zero():
    lrs = [warmup_linear_decay(s, 4, 20) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[12] == 0.5 and lrs[20] == 0.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert warmup_linear_decay(0, 0, 10) == 1.0
