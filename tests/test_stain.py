"""histofold.stain: Reinhard and Macenko stain normalization (numpy only; CPU, fast)."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from histofold import stain

PCAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcam_jpeg"

H_REF = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E_REF = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])


def _rotate(v, axis, degrees):
    """Rodrigues rotation of v about axis."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    return v * np.cos(t) + np.cross(k, v) * np.sin(t) + k * (k @ v) * (1 - np.cos(t))


def _angle(a, b):
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def synth(h, e, size=64, seed=0, bg_frac=0.15, noise=1.0):
    """An H&E-like image from known OD stain vectors: 30 % of pixels pure H, 30 % pure E, the rest
    mixtures, Gaussian noise in intensity, and bg_frac of near-white glass (min channel >= 249, so OD
    below 0.15 in every channel). Pure-stain concentrations reach 3: eosin's red OD is only 0.07 per
    unit, and Macenko estimates from pixels with OD >= beta = 0.15 in *every* channel, so only dense
    pure-eosin pixels (c_E > 2.1) take part -- as in real slides, where the estimated E vector is
    pulled toward H by the mixtures."""
    rng = np.random.default_rng(seed)
    n = size * size
    kind = rng.choice(3, n, p=[0.3, 0.3, 0.4])
    ch = np.where(kind == 0, rng.uniform(0.2, 3.0, n), np.where(kind == 1, 0.0, rng.gamma(2.0, 0.3, n)))
    ce = np.where(kind == 1, rng.uniform(0.2, 3.0, n), np.where(kind == 0, 0.0, rng.gamma(2.0, 0.3, n)))
    od = ch[:, None] * h + ce[:, None] * e
    img = 256.0 * np.exp(-od) - 1.0 + noise * rng.standard_normal((n, 3))
    bg = rng.random(n) < bg_frac
    img[bg] = 255 - rng.integers(0, 7, (int(bg.sum()), 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).reshape(size, size, 3)


def load_pcam(n_per_class=8, split="train", offset=0):
    if not PCAM.exists():
        pytest.skip(f"real fixture {PCAM} not present")
    from PIL import Image
    files = []
    for label in ("0", "1"):
        files += sorted((PCAM / split / label).glob("*.jpg"))[offset:offset + n_per_class]
    if len(files) < 2 * n_per_class:
        pytest.skip(f"not enough images in {PCAM / split}")
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def tissue_lab_mean(img, mask=None):
    lab = stain._rgb_to_lab(img).reshape(-1, 3)
    if mask is None:
        mask = lab[:, 0] <= 90.0
    return lab[mask].mean(axis=0), mask


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------------------------------------------
# Macenko: known answers

ROTATED = (_rotate(H_REF, [0, 0, 1], -20.0), _rotate(E_REF, [0, 0, 1], -20.0))
IN_PLANE = (_rotate(H_REF, np.cross(H_REF, E_REF), -20.0), _rotate(E_REF, np.cross(H_REF, E_REF), -20.0))


@pytest.mark.parametrize("h,e", [(H_REF, E_REF), ROTATED, IN_PLANE, (ROTATED[0], E_REF)],
                         ids=["standard", "rotated-20deg-about-blue", "rotated-20deg-in-plane", "mixed"])
def test_macenko_recovers_known_stain_vectors(h, e):
    assert np.all(h > 0) and np.all(e > 0) and h[0] > e[0]        # physical vectors, H redder in OD
    img = synth(h, e, size=96, seed=1)
    norm = stain.fit(img, "macenko")
    he = np.array(norm.params["stain_matrix"])
    assert he.shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(he, axis=1), 1.0, atol=1e-9)
    assert _angle(he[0], h) < 3.0, (he, h)                      # haematoxylin first
    assert _angle(he[1], e) < 3.0, (he, e)
    # the max concentrations are the 99th percentiles of the true concentrations (known up to noise)
    assert all(c > 0 for c in norm.params["max_concentrations"])


def test_macenko_order_does_not_depend_on_which_angle_is_smaller():
    # swap roles in the plane by mirroring: same vectors, image built with E first
    img = synth(E_REF, H_REF, size=96, seed=2)
    he = np.array(stain.fit(img, "macenko").params["stain_matrix"])
    assert _angle(he[0], H_REF) < 3.0 and _angle(he[1], E_REF) < 3.0


def test_macenko_matches_a_direct_implementation_on_one_image():
    """Our batched estimate == a plain per-image numpy transcription of the same conventions."""
    img = synth(H_REF, E_REF, size=64, seed=3, noise=2.0)
    p = stain.fit(img, "macenko").params
    od = -np.log((img.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)
    odhat = od[np.all(od >= 0.15, axis=1)]
    _, v = np.linalg.eigh(np.cov(odhat.T))
    plane = v[:, 1:3]
    t = odhat @ plane
    phi = np.arctan2(t[:, 1], t[:, 0])
    # the reference code's angle origin differs from ours (mean direction), which is harmless here
    # because the cloud does not straddle +-pi; percentiles of the angles:
    lo, hi = np.percentile(phi, [1, 99])
    v1 = plane @ [np.cos(lo), np.sin(lo)]
    v2 = plane @ [np.cos(hi), np.sin(hi)]
    v1, v2 = (v1, v2) if v1 @ np.ones(3) > 0 else (-v1, -v2)
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)
    he = np.array(p["stain_matrix"])
    assert _angle(he[0], h) < 0.05 and _angle(he[1], e) < 0.05
    conc = np.linalg.lstsq(np.stack([h, e], 1), odhat.T, rcond=None)[0]
    np.testing.assert_allclose(p["max_concentrations"], np.percentile(conc, 99, axis=1), rtol=2e-3)


# ---------------------------------------------------------------------------------------------------
# Identity and known targets

@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_self_normalization_is_near_identity_on_a_two_stain_image(method):
    img = synth(H_REF, E_REF, size=96, seed=4)
    out = stain.fit(img, method)(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < 0.5


def test_self_normalization_on_real_patches():
    x = load_pcam(4)
    for img in x:
        r = stain.fit(img, "reinhard")
        assert np.abs(r(img).astype(int) - img).mean() < 0.5
        try:
            m = stain.fit(img, "macenko")
        except ValueError:                      # a blank patch: nothing to fit
            continue
        # classic Macenko rebuilds OD from two stains only, dropping the out-of-plane OD residual
        # (~5 % of the OD norm on PCam JPEGs): 2-7 levels mean abs diff even toward itself
        assert np.abs(m(img).astype(int) - img).mean() < 8.0
        # keeping the residual (residual_weight=1) makes self-normalization an identity
        keep = stain.StainNormalizer("macenko", {**m.params, "residual_weight": 1.0})
        assert np.abs(keep(img).astype(int) - img).mean() < 0.5


def test_reinhard_output_has_target_lab_statistics():
    train = load_pcam(8, offset=0)
    norm = stain.fit(train, "reinhard")
    tm, ts = np.array(norm.params["target_means"]), np.array(norm.params["target_stds"])
    x = load_pcam(8, offset=20)
    y = norm(x)
    tight = 0
    for a, b in zip(x, y):
        lab_a = stain._rgb_to_lab(a).reshape(-1, 3)
        mask = lab_a[:, 0] <= 90.0
        if mask.mean() < 0.05:
            continue
        lab_b = stain._rgb_to_lab(b).reshape(-1, 3)[mask]
        mu_err = np.abs(lab_b.mean(0) - tm)
        sd_ratio = lab_b.std(0) / ts
        # the closed-form Reinhard map and the pixels it sends out of the sRGB gamut
        mu, sd = lab_a[mask].mean(0), lab_a[mask].std(0)
        assert np.all(sd > norm.params["std_floor"])           # no gain capped in these patches
        ideal = (lab_a[mask] - mu) * ts / sd + tm
        f = (ideal - stain._K) @ stain._A_INV.T
        d = 6 / 29
        lin = np.where(f > d, f ** 3, 3 * d * d * (f - 4 / 29)) @ stain._M_XYZN2RGB.T
        in_gamut = np.all((lin >= 0) & (lin <= 1), axis=1)
        # our output is that map, rounded, wherever it stays in gamut
        diff = np.abs(stain._lab_to_rgb(ideal).astype(int) - b.reshape(-1, 3)[mask]).max(axis=1)
        assert diff[in_gamut].max() <= 1
        if in_gamut.mean() >= 0.99:
            assert mu_err.max() < 0.1 and np.all(np.abs(sd_ratio - 1) < 0.01), (mu_err, sd_ratio)
            tight += 1
        else:
            # clipping moves the statistics: low-contrast patches get large gains (3.5x on b for one
            # here) and their stretched tails are clipped
            assert mu_err.max() < 1.5 and np.all((sd_ratio > 0.5) & (sd_ratio < 1.5)), (mu_err, sd_ratio)
    assert tight >= 4


def test_lab_round_trip_and_known_values():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20000, 3)).astype(np.uint8)
    rgb[:500] = rng.integers(0, 25, (500, 3))            # the linear (dark) branch of f
    back = stain._lab_to_rgb(stain._rgb_to_lab(rgb))
    assert np.abs(back.astype(int) - rgb).max() <= 1
    # reference formulas in float64
    v = rgb / 255.0
    lin = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    xyz = lin @ stain._M_RGB2XYZ.T / stain._WHITE
    d = 6 / 29
    f = np.where(xyz > d ** 3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    ref = np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)
    np.testing.assert_allclose(stain._rgb_to_lab(rgb), ref, atol=2e-3)
    known = stain._rgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], np.uint8))
    np.testing.assert_allclose(known, [[100, 0, 0], [0, 0, 0], [53.2408, 80.0925, 67.2032]], atol=2e-3)


# ---------------------------------------------------------------------------------------------------
# Background, blank and degenerate images

def _mixed_image():
    img = synth(H_REF, E_REF, size=64, seed=5, bg_frac=0.0).copy()
    rng = np.random.default_rng(6)
    img[:, :20] = 255 - rng.integers(0, 30, (64, 20, 3))     # glass, some of it above the thresholds
    img[50:, 40:] = 255
    return img


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_background_pixels_are_left_exactly_alone(method):
    img = _mixed_image()
    target = stain.fit(synth(ROTATED[0], ROTATED[1], seed=7), method)
    out = target(img)
    if method == "macenko":
        bg = img.min(axis=-1) >= 220                 # OD = -log((I+1)/256) < 0.15  <=>  I >= 220
        assert np.all(-np.log((img[bg].astype(float) + 1) / 256) < 0.15)
    else:
        bg = stain._rgb_to_lab(img)[..., 0] > 90.0
    assert bg.sum() > 500 and (~bg).sum() > 500
    assert np.array_equal(out[bg], img[bg])
    assert np.abs(out[~bg].astype(int) - img[~bg]).mean() > 3          # tissue did change


def _blank_images():
    rng = np.random.default_rng(8)
    white = np.full((48, 48, 3), 255, np.uint8)
    glass = (245 + rng.integers(0, 10, (48, 48, 3))).astype(np.uint8)
    pink = np.broadcast_to(np.array([200, 120, 170], np.uint8), (48, 48, 3)).copy()
    black = np.zeros((48, 48, 3), np.uint8)
    dark = np.clip(np.array([45, 35, 41]) + rng.normal(0, 1.5, (48, 48, 3)), 0, 255).astype(np.uint8)
    grey = np.clip(np.array([225, 220, 226]) + rng.normal(0, 1.5, (48, 48, 3)), 0, 255).astype(np.uint8)
    tiny = white.copy()
    tiny[:4, :5] = [150, 60, 140]                                      # 20 tissue pixels < 50
    return {"white": white, "glass": glass, "pink": pink, "black": black, "dark": dark, "grey": grey,
            "tiny": tiny}


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
@pytest.mark.parametrize("kind", list(_blank_images()))
def test_blank_uniform_and_tiny_tissue_images_come_back_unchanged(method, kind):
    img = _blank_images()[kind]
    norm = stain.fit(synth(H_REF, E_REF, seed=9), method)
    out = norm(img)
    assert out.dtype == np.uint8 and np.array_equal(out, img)
    batch = np.stack([img, synth(H_REF, E_REF, size=48, seed=10)])
    out = norm(batch)
    assert np.array_equal(out[0], img) and not np.array_equal(out[1], batch[1])


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_fit_skips_blank_images_and_refuses_all_blank(method):
    real = [synth(H_REF, E_REF, size=48, seed=s, noise=2.0) for s in range(5)]
    blanks = list(_blank_images().values()) * 3                        # blanks outnumber tissue 4:1
    a = stain.fit(np.stack(real), method)
    b = stain.fit(real + blanks, method)
    assert a.params == b.params
    with pytest.raises(ValueError, match="no image with enough tissue"):
        stain.fit(blanks, method)


def test_fit_accepts_a_list_of_sizes_a_single_image_and_max_images():
    imgs = [synth(H_REF, E_REF, size=s, seed=s) for s in (32, 48, 64, 48)]
    n = stain.fit(imgs, "macenko")
    assert _angle(np.array(n.params["stain_matrix"])[0], H_REF) < 4
    single = stain.fit(imgs[2], "reinhard")
    assert single.params == stain.fit(imgs[2][None], "reinhard").params
    assert stain.fit(imgs, "reinhard", max_images=1).params == stain.fit(imgs[0], "reinhard").params
    with pytest.raises(ValueError, match="'gamma'"):
        stain.fit(imgs, "macenko", gamma=1.0)
    with pytest.raises(ValueError, match="'beta'"):
        stain.fit(imgs, "macenko", beta=-1.0)
    assert stain.fit(imgs, "none").method == "none"


# ---------------------------------------------------------------------------------------------------
# Vectorization, API, JSON

@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_batch_equals_each_image_alone_and_chunking_is_invisible(method, monkeypatch):
    imgs = np.stack([synth(H_REF, E_REF, size=40, seed=s, noise=1 + s % 3) for s in range(6)]
                    + [_blank_images()["glass"][:40, :40], _mixed_image()[:40, :40]])
    norm = stain.fit(synth(*ROTATED, seed=11), method)
    together = norm(imgs)
    alone = np.stack([norm(im) for im in imgs])
    assert np.array_equal(together, alone)
    monkeypatch.setattr(stain, "_CHUNK_PIXELS", 3 * 40 * 40)            # chunks of 3, 3, 2 images
    assert np.array_equal(norm(imgs), together)


def test_masked_percentile_equals_numpy_percentile():
    rng = np.random.default_rng(12)
    for n_cols in (7, 300, 5000):
        v = rng.standard_normal((6, n_cols)).astype(np.float32)
        v[1] = np.round(v[1])                                           # ties
        mask = rng.random((6, n_cols)) < [[0.9], [0.5], [0.02], [1.0], [0.3], [0.7]]
        mask[4] = False
        mask[4, 3] = True                                               # a single value
        n = mask.sum(1)
        for q in (0.0, 1.0, 50.0, 99.0, 100.0):
            got = stain._masked_percentile(v, mask, n, q)
            assert np.all(np.isfinite(got))
            for r in np.flatnonzero(n):
                want = np.percentile(v[r][mask[r]].astype(np.float64), q)
                np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-6)


def test_none_method_and_input_validation():
    img = synth(H_REF, E_REF, size=16)
    none = stain.StainNormalizer("none", {})
    assert none(img) is img
    assert stain.StainNormalizer.from_json(none.to_json()) == none
    norm = stain.fit(img, "reinhard")
    assert norm(img).shape == img.shape                                 # (H, W, 3) in, (H, W, 3) out
    assert norm(img[None]).shape == (1,) + img.shape
    assert norm(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 8, 8, 3)
    with pytest.raises(TypeError):
        norm(img.astype(np.float32))
    with pytest.raises(ValueError):
        norm(img[..., :2])


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_json_round_trip_gives_the_same_output(method):
    img = _mixed_image()
    norm = stain.fit(synth(*ROTATED, seed=13), method)
    d = json.loads(json.dumps(norm.to_json()))
    assert set(d) == {"method", "params"} and d["method"] == method
    assert all(isinstance(v, (float, list)) for v in d["params"].values())
    again = stain.StainNormalizer.from_json(d)
    assert again == norm
    assert np.array_equal(again(img), norm(img))


def test_from_json_rejects_bad_dicts_naming_the_key():
    good = stain.fit(synth(H_REF, E_REF), "macenko").to_json()
    for key in ("stain_matrix", "max_concentrations"):
        bad = {"method": "macenko", "params": {k: v for k, v in good["params"].items() if k != key}}
        with pytest.raises(ValueError, match=key):
            stain.StainNormalizer.from_json(bad)
    for key in ("method", "params"):
        with pytest.raises(ValueError, match=key):
            stain.StainNormalizer.from_json({k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match="vahadane"):
        stain.StainNormalizer.from_json({"method": "vahadane", "params": {}})
    with pytest.raises(ValueError, match="betta"):
        stain.StainNormalizer.from_json({"method": "macenko", "params": {**good["params"], "betta": 0.1}})
    with pytest.raises(ValueError, match="stain_matrix"):
        stain.StainNormalizer.from_json({"method": "macenko",
                                         "params": {**good["params"], "stain_matrix": [[1, 0, 0]]}})
    with pytest.raises(ValueError, match="target_stds"):
        stain.StainNormalizer.from_json({"method": "reinhard", "params": {"target_means": [50, 0, 0]}})
    # thresholds are optional (defaults), the targets are not
    minimal = stain.StainNormalizer.from_json(
        {"method": "reinhard", "params": {"target_means": [55, 25, -10], "target_stds": [18, 5, 4]}})
    assert minimal.params["white_l"] == 90.0


# ---------------------------------------------------------------------------------------------------
# Property test: any small image, any content

_LOOSE = {"min_tissue_px": 1.0, "min_tissue_frac": 0.0}
_NORMS = [
    stain.fit(synth(H_REF, E_REF, seed=14), "reinhard"),
    stain.fit(synth(H_REF, E_REF, seed=14), "macenko"),
    stain.StainNormalizer("reinhard", {**stain.fit(synth(H_REF, E_REF, seed=14), "reinhard").params,
                                       **_LOOSE, "min_std": 1e-6}),
    stain.StainNormalizer("macenko", {**stain.fit(synth(H_REF, E_REF, seed=14), "macenko").params,
                                      **_LOOSE, "min_intensity_std": 0.0, "min_angle_deg": 0.0,
                                      "residual_weight": 0.5}),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda s: arrays(np.uint8, (s[0], s[1], s[2], 3))), which=st.integers(0, len(_NORMS) - 1))
def test_any_small_image_gives_same_shape_uint8_without_warnings(images, which):
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # an invalid value / divide by zero would warn
        out = _NORMS[which](images)
    assert out.shape == images.shape and out.dtype == np.uint8


# ---------------------------------------------------------------------------------------------------
# Real patches

def test_real_patches_move_toward_the_reference():
    x = load_pcam(8, split="train")                     # 16 patches, train/{0,1}
    ref = load_pcam(8, split="valid")                   # other patches (other slides) as the reference
    ref_mu = np.median([tissue_lab_mean(r)[0] for r in ref], axis=0)
    # Macenko matches stain vectors and 99th-percentile concentrations, not the mean colour, so the
    # LAB-mean criterion is weaker for it (10 of 15 here); its own criterion is checked below
    for method, need in (("reinhard", 0.9), ("macenko", 0.6)):
        norm = stain.fit(ref, method)
        y = norm(x)
        changed = closer = 0
        for a, b in zip(x, y):
            if np.array_equal(a, b):                    # blank patch, left alone
                continue
            changed += 1
            mu_a, mask = tissue_lab_mean(a)
            mu_b, _ = tissue_lab_mean(b, mask)
            closer += np.linalg.norm(mu_b - ref_mu) < np.linalg.norm(mu_a - ref_mu)
        assert changed >= 12
        assert closer >= need * changed, (method, closer, changed)
    # Macenko's own measure: stain vectors re-estimated on the outputs are those of the reference
    norm = stain.fit(ref, "macenko")
    target = np.array(norm.params["stain_matrix"])
    _, _, he_in, _, _, ok_in = stain._macenko_estimate(stain._to_planar(x), norm.params)
    _, _, he_out, _, _, ok_out = stain._macenko_estimate(stain._to_planar(norm(x)), norm.params)
    ok = ok_in & ok_out
    before = [max(_angle(h[0], target[0]), _angle(h[1], target[1])) for h in he_in[ok]]
    after = [max(_angle(h[0], target[0]), _angle(h[1], target[1])) for h in he_out[ok]]
    print("max H/E angle to the target, before:", np.round(before, 1), "after:", np.round(after, 1))
    # not all the way (median ~5 degrees from ~9 here): the target's max E concentration is high (~6 on
    # PCam), so scaled outputs saturate in places and the re-estimation sees clipped pixels
    assert np.median(after) < 0.7 * np.median(before), (before, after)
    assert np.mean(np.array(after) < np.array(before)) >= 0.8
