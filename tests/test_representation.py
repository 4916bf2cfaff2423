"""fairbook.representation: t-SNE maps, the attribute probe and unbiased MMD² group distances."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from scipy import stats as st  # noqa: E402
from scipy.spatial.distance import pdist  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from fairbook import plots  # noqa: E402
from fairbook import representation as rep  # noqa: E402
from fairbook.representation import Features, RepresentationError  # noqa: E402


def unit(X):
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def sample(n, seed, shift=0.0, dims=8, groups=("Asian", "Black", "White"), p=(0.2, 0.3, 0.5)):
    """Unit-norm features; group ``groups[0]``'s first coordinate is moved by ``shift``."""
    rng = np.random.default_rng(seed)
    g = rng.choice(groups, p=p, size=n)
    X = rng.normal(size=(n, dims))
    X[g == groups[0], 0] += shift
    return Features(unit(X), rng.integers(0, 2, n), g)


# ------------------------------------------------------------------------------------------------------ MMD
def brute_mmd2(X, Y, s):
    k = lambda a, b: math.exp(-sum((a - b) ** 2) / (2 * s * s))  # noqa: E731
    m, n = len(X), len(Y)
    xx = sum(k(X[i], X[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(Y[i], Y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x, y) for x in X for y in Y) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_unbiased_matches_the_u_statistic_computed_pair_by_pair():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(4, 3)), rng.normal(size=(5, 3)) + 0.5
    assert rep.mmd2_unbiased(X, Y, 1.3) == pytest.approx(brute_mmd2(X, Y, 1.3), rel=1e-12)
    # hand-worked: two points at 0 and 1 on a line against two points at 0 and 1 -> k(0,1) = e^{-1/2}
    X = np.array([[0.0], [1.0]])
    e = math.exp(-0.5)
    assert rep.mmd2_unbiased(X, X, 1.0) == pytest.approx(e + e - 2 * (2 + 2 * e) / 4)


def test_median_bandwidth_is_the_median_pairwise_distance():
    X = np.random.default_rng(1).normal(size=(30, 4))
    assert rep.median_bandwidth(X) == pytest.approx(np.median(pdist(X)), rel=1e-10)


def test_unbiased_mmd2_is_zero_on_average_where_the_biased_one_is_positive():
    rng = np.random.default_rng(2)
    unbiased, biased = [], []
    for _ in range(200):
        X, Y = rng.normal(size=(10, 2)), rng.normal(size=(10, 2))
        unbiased.append(rep.mmd2_unbiased(X, Y, 1.0))
        K = rep.gaussian_kernel(np.vstack([X, Y]), np.vstack([X, Y]), 1.0)
        biased.append(K[:10, :10].mean() + K[10:, 10:].mean() - 2 * K[:10, 10:].mean())
    unbiased = np.array(unbiased)
    assert abs(unbiased.mean()) < 3 * unbiased.std() / np.sqrt(len(unbiased))
    assert min(biased) > 0


def test_group_distances_rows_are_each_group_against_the_rest():
    f = sample(60, 3, shift=1.0)
    d = rep.group_distances(f.X, f.group, n_boot=20, n_perm=20)
    bw = rep.median_bandwidth(f.X)
    assert list(d["comparison"]) == ["Asian vs rest", "Black vs rest", "White vs rest"]
    assert d["bandwidth"].tolist() == pytest.approx([bw] * 3)
    for row in d.to_dict("records"):
        inside = f.group == row["group"]
        assert row["n_group"] == inside.sum() and row["n_rest"] == (~inside).sum()
        assert row["mmd2"] == pytest.approx(rep.mmd2_unbiased(f.X[inside], f.X[~inside], bw), rel=1e-9)


def test_two_groups_give_one_symmetric_row():
    f = sample(40, 4, groups=("Female", "Male"), p=(0.5, 0.5))
    d = rep.group_distances(f.X, f.group, n_boot=10, n_perm=10)
    assert d["comparison"].tolist() == ["Female vs Male"]


def test_bootstrap_replicate_never_pairs_copies_of_one_sample():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(6, 2))
    K = rep.gaussian_kernel(X, X, 1.0)
    counts = np.array([[2.0, 1, 0, 1, 3, 1]])           # samples 0-2 in group A, 3-5 in group B
    a = counts * np.array([1, 1, 1, 0, 0, 0])
    b = counts - a
    got = rep._weighted_mmd2(np.diag(K), a, b, a @ K, b @ K)[0]
    origin = np.repeat(np.arange(6), counts[0].astype(int))  # the resample, written out
    A, B = origin[origin < 3], origin[origin >= 3]

    def within(S):
        pairs = [K[i, j] for p, i in enumerate(S) for q, j in enumerate(S) if p != q and i != j]
        return sum(pairs) / len(pairs)

    expected = within(A) + within(B) - 2 * np.mean([K[i, j] for i in A for j in B])
    assert got == pytest.approx(expected, rel=1e-12)


def test_same_distribution_gives_a_distance_compatible_with_zero():
    f = sample(400, 6, shift=0.0)
    d = rep.group_distances(f.X, f.group, n_boot=200, n_perm=200, seed=0)
    assert (d["ci_lo"] <= 0).all() and (d["ci_hi"] >= 0).all()
    assert (d["p_perm"] > 0.05).all()
    assert (d["mmd2"].abs() < 0.01).all()


def test_shifted_group_is_clearly_distant_and_the_others_are_not_far():
    f = sample(400, 7, shift=1.5)
    d = rep.group_distances(f.X, f.group, n_boot=200, n_perm=200, seed=0).set_index("group")
    assert d.loc["Asian", "ci_lo"] > 0
    assert d.loc["Asian", "p_perm"] == pytest.approx(1 / 201)
    assert d.loc["Asian", "mmd2"] > 5 * d.loc["Black", "mmd2"]


def test_permutations_and_resamples_are_fixed_by_the_seed():
    f = sample(80, 8, shift=0.5)
    a, b = (rep.group_distances(f.X, f.group, n_boot=30, n_perm=30, seed=3) for _ in range(2))
    assert np.array_equal(np.stack(a["boot"]), np.stack(b["boot"]))
    assert np.array_equal(np.stack(a["perm"]), np.stack(b["perm"]))


# ---------------------------------------------------------------------------------------------- attribute probe
def test_probe_on_random_features_is_at_chance():
    train, val, test = sample(300, 10), sample(200, 11), sample(400, 12)
    probe = rep.attribute_probe(train, val, test, n_boot=300)
    assert probe["ci_lo"] <= 0.5 <= probe["ci_hi"]
    assert abs(probe["auc"] - 0.5) < 0.08


def encoded(n, seed):
    """Features in which every group moves its own coordinate: the group is linearly decodable."""
    f = sample(n, seed)
    X = f.X.copy()
    for k, name in enumerate(("Asian", "Black", "White")):
        X[f.group == name, k] += 1.0
    return Features(unit(X), f.label, f.group)


def test_probe_reads_an_encoded_group_and_matches_scikit_learn():
    train, val, test = encoded(300, 13), encoded(200, 14), encoded(400, 15)
    probe = rep.attribute_probe(train, val, test, n_boot=100)
    clf = LogisticRegression(C=probe["C"], max_iter=2000).fit(train.X, train.group)
    proba = clf.predict_proba(test.X)
    expected = roc_auc_score(test.group, proba, multi_class="ovr", average="macro")
    assert probe["auc"] == pytest.approx(expected, abs=1e-9)
    for k, g in enumerate(clf.classes_):
        assert probe["group_auc"][g] == pytest.approx(roc_auc_score(test.group == g, proba[:, k]), abs=1e-9)
        assert len(probe["group_boot"][g]) == 100
    assert np.allclose(np.mean(list(probe["group_boot"].values()), axis=0), probe["boot"])
    assert probe["auc"] > 0.95 and probe["ci_lo"] > 0.9
    assert probe["groups"] == ["Asian", "Black", "White"]
    assert probe["n"] == {"train": 300, "val": 200, "test": 400}


def test_binary_probe_is_the_plain_roc_auc():
    kw = dict(shift=1.0, groups=("Female", "Male"), p=(0.4, 0.6))
    train, val, test = sample(200, 16, **kw), sample(100, 17, **kw), sample(150, 18, **kw)
    probe = rep.attribute_probe(train, val, test, n_boot=0)
    clf = LogisticRegression(C=probe["C"], max_iter=2000).fit(train.X, train.group)
    assert probe["auc"] == pytest.approx(roc_auc_score(test.group == "Male", clf.predict_proba(test.X)[:, 1]))
    assert len(probe["boot"]) == 0


def test_probe_chooses_c_on_validation_never_on_test():
    train, val = sample(200, 19, shift=0.8), sample(150, 20, shift=0.8)
    first = rep.attribute_probe(train, val, sample(300, 21, shift=0.8), n_boot=0)
    other = rep.attribute_probe(train, val, sample(300, 22, shift=-2.0), n_boot=0)   # a very different test set
    assert first["C"] == other["C"] and first["val_auc_by_C"] == other["val_auc_by_C"]
    by_hand = {C: roc_auc_score(val.group, LogisticRegression(C=C, max_iter=2000).fit(train.X, train.group)
                                .predict_proba(val.X), multi_class="ovr") for C in rep.CS}
    assert first["val_auc_by_C"] == pytest.approx(by_hand)
    assert first["C"] == max(by_hand, key=by_hand.get)
    assert first["auc"] != other["auc"]


# ------------------------------------------------------------------------------------------------- over seeds
def test_over_seeds_averages_replicates_and_permutations():
    rows = pd.DataFrame({"model": ["A", "A", "B", "B"], "seed": [0, 1, 0, 1], "mmd2": [0.1, 0.3, 0.0, 0.02],
                         "boot": [np.array([0.0, 0.2, 0.4]), np.array([0.2, 0.4, 0.6]),
                                  np.array([0.0, 0.1, -0.1]), np.array([0.0, 0.0, 0.0])],
                         "perm": [np.array([0.1, 0.3]), np.array([0.1, 0.0]),
                                  np.array([0.0, 0.0]), np.array([0.04, 0.0])]})
    s = rep.over_seeds(rows, "model", "mmd2", level=1.0).set_index("model")
    assert s.loc["A", "mean"] == pytest.approx(0.2) and s.loc["A", "std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert (s.loc["A", "ci_lo"], s.loc["A", "ci_hi"]) == pytest.approx((0.1, 0.5))  # min and max of mean replicates
    assert s.loc["A", "p_perm"] == pytest.approx(1 / 3)        # mean permuted (0.1, 0.15), none >= 0.2
    assert s.loc["B", "p_perm"] == pytest.approx(2 / 3)        # mean permuted (0.02, 0.0), one >= 0.01
    diff = rep.compare(s.reset_index(), baseline="A", key="model", level=1.0)
    assert diff["diff"].iloc[0] == pytest.approx(-0.19)            # replicates (0, .05, -.05) - (.1, .3, .5)
    assert (diff["ci_lo"].iloc[0], diff["ci_hi"].iloc[0]) == pytest.approx((-0.55, -0.1))
    assert not diff["ci_contains_0"].iloc[0]
    seed_level = rep.compare(s.reset_index(), baseline="A", key="model").iloc[0]   # paired on seed, 1 df
    half = st.t.ppf(0.975, 1) * np.std([-0.1, -0.28], ddof=1) / np.sqrt(2)
    assert (seed_level["seed_ci_lo"], seed_level["seed_ci_hi"]) == pytest.approx((-0.19 - half, -0.19 + half))
    assert seed_level["p_seeds"] == pytest.approx(st.ttest_rel([0.0, 0.02], [0.1, 0.3]).pvalue)
    table = rep.format_summary(s.reset_index())
    assert table.loc["A", "mean\u00a0±\u00a0std"] == "0.200\u00a0±\u00a00.141"  # the header never wraps either
    assert table.loc["A", "CI of seed mean"] == "[0.100,\u00a00.500]"


def test_over_seeds_refuses_replicates_of_different_lengths():
    rows = pd.DataFrame({"model": ["A", "A"], "auc": [0.6, 0.7], "boot": [np.zeros(3), np.zeros(4)]})
    with pytest.raises(RepresentationError, match="replicate counts differ"):
        rep.over_seeds(rows, "model", "auc")


# ------------------------------------------------------------------------------------------------------ t-SNE
def test_tsne_is_deterministic_for_a_seed():
    X = sample(60, 23).X
    a, b = rep.tsne(X, seed=1), rep.tsne(X, seed=1)
    assert a.shape == (60, 2) and np.array_equal(a, b)


def test_tsne_points_use_the_same_samples_for_every_model_and_plot_as_a_grid():
    f = sample(80, 24, shift=2.0)
    g = Features(f.X[:, ::-1].copy(), f.label, f.group)
    points = rep.tsne_points({"CLIP": f, "FairCLIP": g}, n_points=30, seed=0)
    assert list(points.columns) == ["model", "x", "y", "group", "label"]
    assert points.groupby("model").size().tolist() == [30, 30]
    assert np.array_equal(points["group"][:30], points["group"][30:])
    assert set(points["label"]) <= {"glaucoma", "no glaucoma"}
    fig = plots.tsne_grid(points)
    axes = np.array(fig.axes).reshape(2, 2)
    assert [len(ax.collections[0].get_offsets()) for ax in axes.flat] == [30, 30, 30, 30]
    assert [ax.get_title() for ax in axes[0]] == ["by group", "by label"]
    assert axes[1, 0].get_xlabel() == "t-sne 1" and axes[1, 0].get_ylabel() == "FairCLIP\nt-sne 2"
    plt.close(fig)


def test_tsne_points_refuse_features_of_other_samples():
    f, g = sample(20, 25), sample(20, 26)
    with pytest.raises(RepresentationError, match="same split"):
        rep.tsne_points({"CLIP": f, "FairCLIP": g}, n_points=10)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, match", [
    (lambda: rep.image_features(None, None, None, "colour"), "unknown attribute 'colour'"),
    (lambda: rep.group_distances(np.zeros((5, 2)), ["a"] * 4), "4 group labels for 5 feature rows"),
    (lambda: rep.group_distances(np.eye(5), ["a"] * 5), "need at least 2"),
    (lambda: rep.group_distances(np.eye(5), ["a"] * 4 + ["b"]), "at least 2 samples"),
    (lambda: rep.attribute_probe(sample(50, 1), sample(50, 2), sample(50, 3, groups=("Asian", "Other"), p=(.5, .5))),
     "test groups differ from training groups"),
    (lambda: rep.tsne(np.zeros((3, 2))), "at least 5 samples"),
])
def test_bad_input_raises_one_line(call, match):
    with pytest.raises(RepresentationError, match=match) as info:
        call()
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_image_features_keep_known_groups_in_item_order(smoke_data, clip, one_thread):
    from torch.utils.data import DataLoader

    from fairbook.data import FairVLMed
    from fairbook.train import extract_features

    model, _, preprocess, _ = clip
    data = FairVLMed(smoke_data, "Training", preprocess).subset(40, 0)
    images = rep.load_images(data, batch_size=16)
    f = rep.image_features(model, preprocess, images, "ethnicity")
    X, y, codes = extract_features(model, DataLoader(data, batch_size=16))
    known = codes[:, 2] != -1
    assert np.allclose(f.X, X[known], atol=1e-5) and np.array_equal(f.label, y[known])
    assert f.group.tolist() == data.metadata["ethnicity_name"][known].tolist()
    assert "Unknown" not in set(f.group)
    with pytest.raises(RepresentationError, match="preprocess differs"):
        rep.image_features(model, lambda image: image, images, "ethnicity")
