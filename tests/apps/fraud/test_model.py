"""FraudNet shapes, tree export, calibration/threshold and the batched predictor."""

from __future__ import annotations

import io
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from threadpoolctl import threadpool_limits

from apps.fraud.data import ULB_DENSE_NAMES, ULB_FEATURES
from apps.fraud.evaluate import threshold_for_fpr
from apps.fraud.model import (
    FraudNet,
    FraudNetConfig,
    FraudPredictor,
    load_predictor,
)
from apps.fraud.train import platt_fit
from apps.fraud.trees import TreeEnsemble, export_hgb


@pytest.fixture(autouse=True, scope="module")
def _single_openmp_thread() -> Iterator[None]:
    # sklearn's gradient boosting spins OpenMP threads that starve each other on a busy 2-core box (5x slower).
    with threadpool_limits(1):
        yield


def test_forward_shapes_without_sequence() -> None:
    net = FraudNet(FraudNetConfig(n_dense=7))
    assert net.gru is None
    assert net(torch.randn(5, 7)).shape == (5,)


def test_forward_shapes_with_sequence_and_padding_is_ignored() -> None:
    torch.manual_seed(0)
    net = FraudNet(FraudNetConfig(n_dense=7, n_seq=3, history=4)).eval()
    dense, seq = torch.randn(4, 7), torch.randn(4, 4, 3)
    lengths = torch.tensor([0, 1, 4, 2])
    out = net(dense, seq, lengths)
    assert out.shape == (4,)
    noisy = seq.clone()
    noisy[0] = 99.0  # no history at all
    noisy[1, 1:] = -99.0  # beyond the one real step
    noisy[3, 2:] = 42.0
    torch.testing.assert_close(net(dense, noisy, lengths), out)
    changed = seq.clone()
    changed[2, 0] += 1.0  # a real step must matter
    assert not torch.allclose(net(dense, changed, lengths)[2], out[2])
    with pytest.raises(ValueError, match="sequence branch"):
        net(dense)


def test_standardisation_is_in_the_state_dict() -> None:
    net = FraudNet(FraudNetConfig(n_dense=3, n_seq=2, history=2))
    net.set_standardisation(np.array([[1.0, 2, 3], [3, 4, 5]]), np.array([[0.0, 10], [2, 30]]))
    state = net.state_dict()
    torch.testing.assert_close(state["dense_mean"], torch.tensor([2.0, 3, 4]))
    torch.testing.assert_close(state["seq_mean"], torch.tensor([1.0, 20]))


def _toy(n: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    y = (x[:, 0] + x[:, 1] ** 2 + rng.normal(size=n) > 2.2).astype(np.int64)
    return x, y


def test_exported_trees_reproduce_sklearn() -> None:
    x, y = _toy()
    x_nan = x.copy()
    x_nan[::13, 2] = np.nan  # missing values follow the learned side
    clf = HistGradientBoostingClassifier(max_iter=40, random_state=0).fit(x_nan, y)
    trees = TreeEnsemble(export_hgb(clf))
    np.testing.assert_allclose(trees(torch.from_numpy(x_nan)).numpy(), clf.decision_function(x_nan), atol=1e-6)
    bag = [HistGradientBoostingClassifier(max_iter=20, max_features=0.5, random_state=k).fit(x, y) for k in range(3)]
    again = TreeEnsemble(TreeEnsemble(export_hgb(bag)).registry_state())
    expected = np.mean([c.decision_function(x) for c in bag], axis=0)
    np.testing.assert_allclose(again(torch.from_numpy(x)).numpy(), expected, atol=1e-6)


def test_tree_path_contributions_add_up_to_the_score() -> None:
    x, y = _toy()
    clf = HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(x, y)
    trees = TreeEnsemble(export_hgb(clf))
    xt = torch.from_numpy(x)  # several row blocks of the parallel walk, the last one partial
    contrib = trees.contributions(xt)
    start = trees.expected[trees.roots].sum() + trees.baseline
    torch.testing.assert_close(contrib.sum(1) + start, trees(xt))
    assert contrib[:, 0].abs().mean() > contrib[:, 4].abs().mean()  # x0 drives y, x4 is noise


def test_threshold_keeps_fpr_at_or_below_target() -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random(5000) < 0.05).astype(np.int64)
    scores = rng.normal(size=5000) + 2.5 * labels
    for target in (0.003, 0.01, 0.1):
        t = threshold_for_fpr(scores, labels, target_fpr=target)
        fpr = (scores[labels == 0] >= t).mean()
        assert fpr <= target
        assert fpr > target - 2 / (labels == 0).sum()  # and it is the loosest such threshold
    with pytest.raises(ValueError, match="legitimate"):
        threshold_for_fpr(scores[:3], np.ones(3), target_fpr=0.01)


def test_platt_recovers_a_known_calibration() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=20000)
    labels = (rng.random(20000) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))).astype(np.int64)
    a, b = platt_fit(logits, labels)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(-1.0, abs=0.1)


def _predictor(with_trees: bool = True) -> FraudPredictor:
    torch.manual_seed(0)
    n = len(ULB_DENSE_NAMES)
    cfg = FraudNetConfig(n_dense=n, hidden=8)
    members = [FraudNet(cfg).eval() for _ in range(2)]
    trees = None
    if with_trees:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(400, n)).astype(np.float32)
        clf = HistGradientBoostingClassifier(max_iter=10).fit(x, (x[:, 13] < -1).astype(int))
        trees = TreeEnsemble(export_hgb(clf))
    version = SimpleNamespace(config={"schema": "ulb", "net": cfg.__dict__, "feature_names": list(ULB_DENSE_NAMES)})
    state = FraudPredictor(
        featurize=lambda items: (np.zeros((0, n), np.float32), None, None),
        members=members,
        trees=trees,
        platt=(1.3, -0.2),
        threshold=0.4,
        feature_names=list(ULB_DENSE_NAMES),
        reference=torch.zeros(n),
    ).registry_state()
    buf = io.BytesIO()
    torch.save(state, buf)  # everything must survive the registry's weights_only loading
    return load_predictor(version, torch.load(io.BytesIO(buf.getvalue()), weights_only=True))


def _items(n: int) -> list[dict[str, float]]:
    rng = np.random.default_rng(3)
    return [{k: float(v) for k, v in zip(ULB_FEATURES, row, strict=True)} for row in rng.normal(size=(n, 30))]


@pytest.mark.parametrize("with_trees", [True, False])
def test_predict_batch_contract_and_batch_invariance(with_trees: bool) -> None:
    predictor = _predictor(with_trees)
    items = _items(6)
    out = predictor.predict_batch(items)
    assert len(out) == 6 and predictor.predict_batch([]) == []
    for res in out:
        assert set(res) == {"score", "decision", "threshold", "top_reasons"}
        assert 0.0 <= res["score"] <= 1.0 and res["threshold"] == pytest.approx(0.4)
        assert res["decision"] == ("fraud" if res["score"] >= res["threshold"] else "legit")
        contributions = [r["contribution"] for r in res["top_reasons"]]
        assert len(contributions) == 3 and contributions == sorted(contributions, reverse=True)
        assert {r["feature"] for r in res["top_reasons"]} <= set(ULB_DENSE_NAMES)
    single = [predictor.predict_batch([item])[0]["score"] for item in items]
    np.testing.assert_allclose(single, [r["score"] for r in out], rtol=1e-5)


def test_occlusion_points_at_the_feature_the_trees_use() -> None:
    predictor = _predictor(with_trees=True)
    predictor.members = [_ZeroNet()]  # networks at a constant: only the trees (which split on V14) vary
    predictor.member_floor = 0.0
    item = {k: 0.0 for k in ULB_FEATURES} | {"V14": -3.0}
    reasons = predictor.predict_batch([item])[0]["top_reasons"]
    assert reasons[0]["feature"] == "V14" and reasons[0]["contribution"] > 0


class _ZeroNet(torch.nn.Module):
    def forward(self, dense: torch.Tensor, seq: object = None, lengths: object = None) -> torch.Tensor:
        return torch.zeros(dense.shape[0])


def test_bad_item_is_named() -> None:
    predictor = _predictor()
    bad = _items(2)
    del bad[1]["V5"]
    with pytest.raises(ValueError, match="item 1: missing field 'V5'"):
        predictor.predict_batch(bad)
