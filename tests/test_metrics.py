"""Tests of medgen_common.metrics: each checks a value that the metric must produce, not only that it runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from medgen_common.metrics import (
    RandomFeatureExtractor,
    dice_per_class,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
    load_feature_extractor,
    mean_dice_by_class,
    memorisation_ratio,
    ms_ssim_diversity,
    ms_ssim_scales,
    nearest_neighbour_distances,
    paired_fidelity,
    psnr,
    memorisation_check,
    precision_recall_per_class,
    ssim,
    surface_distances_per_class,
)
from medgen_common.writers import save_memorisation_gallery

IGNORE_JIT_DEPRECATION = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_images(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] with structure at several scales (blurred noise), ``[n, 1, *shape]``."""
    noise = torch.rand(n, 1, *(s // 4 for s in shape), generator=_generator(seed))
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return torch.nn.functional.interpolate(noise, size=shape, mode=mode, align_corners=False)


# --- PSNR / SSIM -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 1, 32, 32), (2, 1, 16, 16, 16)])
def test_psnr_identical_is_inf_and_decreases_with_noise(shape):
    target = torch.rand(shape, generator=_generator())
    noise = torch.randn(shape, generator=_generator(1))
    assert torch.isinf(psnr(target, target, 1.0)).all()
    values = [psnr(target + sigma * noise, target, 1.0) for sigma in (0.01, 0.05, 0.2)]
    assert values[0].shape == (shape[0],)
    assert (values[0] > values[1]).all() and (values[1] > values[2]).all()
    # sigma = 0.01 on a range of 1 is about 40 dB
    assert torch.allclose(values[0], torch.full((shape[0],), 40.0), atol=0.5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ssim_is_one_for_identical_and_lower_with_noise(spatial_dims):
    target = _smooth_images(2, (24,) * spatial_dims)
    assert torch.allclose(ssim(target, target, 1.0, spatial_dims), torch.ones(2), atol=1e-5)
    noisy = target + 0.1 * torch.randn(target.shape, generator=_generator(1))
    values = ssim(noisy, target, 1.0, spatial_dims)
    assert values.shape == (2,) and (values < 0.9).all()


def test_psnr_ssim_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\).*\(2, 1, 8, 9\)"):
        psnr(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 9), 1.0)
    with pytest.raises(ValueError, match=r"\(1, 16, 16\)"):
        psnr(torch.rand(1, 16, 16), torch.rand(1, 16, 16), 1.0)
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16\)"):
        ssim(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16), 1.0, spatial_dims=3)
    with pytest.raises(ValueError, match=r"win_size=11.*\(2, 1, 8, 8\)"):
        ssim(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), 1.0, spatial_dims=2)


# --- Dice ------------------------------------------------------------------------------------------------------------


def _label_map(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Soft probabilistic map ``[B, C, *spatial]`` whose argmax is ``labels`` ``[B, *spatial]``."""
    hard = torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).float()
    return 0.7 * hard + 0.3 / num_classes


def test_dice_perfect_prediction_is_one_2d_and_3d():
    for spatial in ((8, 8), (6, 6, 6)):
        labels = torch.randint(0, 3, (2, *spatial), generator=_generator())
        probs = _label_map(labels, 3)
        assert torch.allclose(probs.sum(1), torch.ones(2, *spatial))
        dice = dice_per_class(probs, probs)
        assert dice.shape == (2, 2) and torch.equal(dice, torch.ones(2, 2))
        assert dice_per_class(probs, probs, include_background=True).shape == (2, 3)


def test_dice_known_overlap_absent_and_false_positive_classes():
    pred = torch.zeros(2, 8, 8, dtype=torch.long)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    pred[0, :4] = 1  # 32 voxels of class 1
    target[0, :2] = 1  # 16 voxels, all inside the prediction: Dice = 2 * 16 / (32 + 16) = 2/3
    pred[1, :2] = 1  # image 1: class 1 exactly right
    target[1, :2] = 1
    pred[1, 7, 7] = 2  # class 2 predicted but absent from the target: Dice 0
    dice = dice_per_class(_label_map(pred, 3), _label_map(target, 3))
    assert dice[0, 0].item() == pytest.approx(2 / 3)
    assert math.isnan(dice[0, 1].item())  # class 2 absent from both in image 0
    assert dice[1, 0].item() == pytest.approx(1.0)
    assert dice[1, 1].item() == 0.0
    means = mean_dice_by_class(_label_map(pred, 3), _label_map(target, 3))
    assert list(means) == [1, 2]
    assert means[1] == pytest.approx((2 / 3 + 1) / 2)
    assert means[2] == 0.0  # the NaN of image 0 is ignored


def test_dice_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\).*\(1, 2, 8, 8\)"):
        dice_per_class(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, 1, 8, 8\)"):
        dice_per_class(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


# --- feature extractors ----------------------------------------------------------------------------------------------


def _one_hot_square(rows: slice, columns: slice, size: int = 16) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., rows, columns] = 1
    return torch.cat([1 - mask, mask], dim=1)


def test_surface_distances_of_a_shifted_square():
    target = _one_hot_square(slice(4, 10), slice(4, 10))
    shifted = _one_hot_square(slice(6, 12), slice(4, 10))  # two rows down
    hd95, assd = surface_distances_per_class(target, target)
    assert hd95.tolist() == [[0.0]] and assd.tolist() == [[0.0]]
    hd95, assd = surface_distances_per_class(shifted, target)
    assert hd95.item() == pytest.approx(2.0) and 0 < assd.item() < 2.0
    hd95_mm, _ = surface_distances_per_class(shifted, target, spacing=(0.5, 1.0))
    assert hd95_mm.item() == pytest.approx(1.0)  # rows are 0.5 mm apart


def test_precision_and_recall_of_overlapping_squares_and_of_missed_or_absent_structures():
    target = _one_hot_square(slice(4, 10), slice(4, 10))  # 36 pixels
    shifted = _one_hot_square(slice(6, 12), slice(4, 10))  # 24 of its 36 pixels inside the target
    half = _one_hot_square(slice(4, 7), slice(4, 10))  # 18 pixels, all inside the target
    precision, recall = precision_recall_per_class(shifted, target)
    assert precision.item() == pytest.approx(24 / 36) and recall.item() == pytest.approx(24 / 36)
    precision, recall = precision_recall_per_class(half, target)
    assert precision.item() == pytest.approx(1.0) and recall.item() == pytest.approx(0.5)
    empty = _one_hot_square(slice(0, 0), slice(0, 0))
    for prediction, reference in ((empty, target), (target, empty)):  # missed or hallucinated: both 0
        precision, recall = precision_recall_per_class(prediction, reference)
        assert precision.item() == 0 and recall.item() == 0
    precision, recall = precision_recall_per_class(empty, empty)  # nothing to score
    assert torch.isnan(precision).all() and torch.isnan(recall).all()


def test_surface_distance_of_a_missed_structure_is_the_diagonal_and_of_an_absent_one_nan():
    target, empty = _one_hot_square(slice(4, 10), slice(4, 10)), _one_hot_square(slice(0, 0), slice(0, 0))
    hd95, assd = surface_distances_per_class(empty, target)
    assert hd95.item() == pytest.approx(16 * 2**0.5) and assd.item() == pytest.approx(16 * 2**0.5)
    hd95, assd = surface_distances_per_class(empty, empty)
    assert torch.isnan(hd95).all() and torch.isnan(assd).all()
    with pytest.raises(ValueError, match="spacing needs 2 values"):
        surface_distances_per_class(target, target, spacing=(1.0,))


def test_load_feature_extractor_without_weights_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="path=None.*TorchScript"):
        load_feature_extractor(None)
    missing = tmp_path / "inception_pool3.ts"
    with pytest.raises(FileNotFoundError, match="inception_pool3.ts.*TorchScript"):
        load_feature_extractor(missing)


@IGNORE_JIT_DEPRECATION
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_extractor_round_trips(tmp_path):
    extractor = RandomFeatureExtractor(spatial_dims=2, in_channels=1, feature_dim=32, seed=3)
    images = torch.rand(5, 1, 32, 32, generator=_generator())
    path = tmp_path / "extractor.ts"
    torch.jit.trace(extractor, images[:2]).save(str(path))
    loaded = load_feature_extractor(path)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    expected = extract_features(extractor, images, batch_size=2)
    assert expected.shape == (5, 32)
    assert torch.allclose(extract_features(loaded, images, batch_size=3), expected, atol=1e-6)


@IGNORE_JIT_DEPRECATION
def test_state_dict_extractor_loads_into_network_def(tmp_path):
    source = RandomFeatureExtractor(spatial_dims=3, in_channels=1, feature_dim=8, seed=0)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = load_feature_extractor(
        path,
        network_def=RandomFeatureExtractor,
        network_kwargs={"spatial_dims": 3, "in_channels": 1, "feature_dim": 8, "seed": 99},
        state_dict_key="state_dict",
    )
    volumes = torch.rand(2, 1, 12, 12, 12, generator=_generator())
    assert torch.equal(extract_features(loaded, volumes), extract_features(source, volumes))
    with pytest.raises(ValueError, match="weights.pt.*not a TorchScript archive"):
        load_feature_extractor(path)


def test_random_feature_extractor_is_seeded_and_leaves_global_rng_alone():
    images = torch.rand(4, 1, 16, 16, generator=_generator())
    state = torch.random.get_rng_state()
    same_a = extract_features(RandomFeatureExtractor(2, 1, seed=0), images)
    same_b = extract_features(RandomFeatureExtractor(2, 1, seed=0), images)
    other = extract_features(RandomFeatureExtractor(2, 1, seed=1), images)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert same_a.shape == (4, 64)
    assert torch.equal(same_a, same_b)
    assert not torch.allclose(same_a, other)
    assert "not Inception" in RandomFeatureExtractor.__doc__
    with pytest.raises(ValueError, match=r"\[B, 1, \*spatial\].*\(4, 2, 16, 16\)"):
        RandomFeatureExtractor(2, 1)(torch.rand(4, 2, 16, 16))


def test_extract_features_repeats_channels_and_checks_output():
    extractor = RandomFeatureExtractor(2, in_channels=3, feature_dim=16)
    grey = torch.rand(5, 1, 16, 16, generator=_generator())
    repeated = extract_features(extractor, grey, batch_size=2, repeat_channels_to=3)
    assert torch.allclose(repeated, extract_features(extractor, grey.repeat(1, 3, 1, 1), batch_size=5), atol=1e-6)
    with pytest.raises(ValueError, match=r"1 or 3 channels.*\(5, 2, 16, 16\)"):
        extract_features(extractor, torch.rand(5, 2, 16, 16), repeat_channels_to=3)
    with pytest.raises(ValueError, match=r"\[B, F\].*\(2, 1, 4, 4\)"):
        extract_features(torch.nn.AvgPool2d(4), torch.rand(2, 1, 16, 16))


def test_extract_features_accepts_pooled_singleton_tail_and_restores_mode():
    extractor = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.AdaptiveAvgPool2d(1))  # [B, 6, 1, 1]
    extractor.train()
    features = extract_features(extractor, torch.rand(3, 1, 16, 16))
    assert features.shape == (3, 6) and extractor.training


# --- FID / KID -------------------------------------------------------------------------------------------------------


def test_frechet_distance_zero_for_identical_and_grows_with_mean_shift():
    features = torch.randn(400, 8, generator=_generator())
    assert abs(frechet_distance(features, features)) < 1e-6
    distances = [frechet_distance(features + shift, features) for shift in (0.5, 1.0, 2.0)]
    # a mean shift of s in each of 8 dimensions adds 8 s^2 and leaves the covariances unchanged
    assert distances == pytest.approx([8 * 0.25, 8 * 1.0, 8 * 4.0], rel=1e-4)
    with pytest.raises(ValueError, match=r"\(400, 8\).*\(400, 7\)"):
        frechet_distance(features, features[:, :7])
    with pytest.raises(ValueError, match=r"\[N, F\].*\(400, 8, 1\)"):
        frechet_distance(features[..., None], features)


def _naive_unbiased_mmd2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Bińkowski et al. (2018) unbiased MMD² with k(x, y) = (x.y / d + 1)^3, written as loops."""
    m, d = a.shape
    k = lambda x, y: (float(x @ y) / d + 1) ** 3  # noqa: E731
    within_a = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_b = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    return within_a + within_b - 2 * across


def test_kid_matches_the_unbiased_polynomial_mmd_formula():
    a = torch.randn(12, 5, generator=_generator(0), dtype=torch.float64)
    b = torch.randn(12, 5, generator=_generator(1), dtype=torch.float64) + 0.3
    mean, std = kernel_inception_distance(a, b, subsets=3, subset_size=12)  # each subset is the whole set
    assert mean == pytest.approx(_naive_unbiased_mmd2(a, b), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_near_zero_for_one_distribution_and_positive_for_a_shift():
    a = torch.randn(600, 16, generator=_generator(0))
    b = torch.randn(600, 16, generator=_generator(1))
    same_mean, same_std = kernel_inception_distance(a, b, subsets=50, subset_size=200)
    shifted_mean, _ = kernel_inception_distance(a, b + 0.5, subsets=50, subset_size=200)
    assert same_std > 0
    assert abs(same_mean) < 0.02
    assert shifted_mean > 0.5 and shifted_mean > 20 * abs(same_mean)
    # unbiased: over independent pairs of samples of one Gaussian, single-subset estimates average to ~0 and
    # take both signs (a biased estimator would be positive every time)
    estimates = [
        kernel_inception_distance(
            torch.randn(50, 16, generator=_generator(2 * s)),
            torch.randn(50, 16, generator=_generator(2 * s + 1)),
            subsets=1,
            subset_size=50,
        )[0]
        for s in range(40)
    ]
    spread = torch.tensor(estimates).std().item()
    assert abs(sum(estimates) / len(estimates)) < 3 * spread / math.sqrt(len(estimates))
    assert min(estimates) < 0 < max(estimates)


def test_kid_is_repeatable_for_a_seed():
    a, b = torch.randn(100, 4, generator=_generator(0)), torch.randn(80, 4, generator=_generator(1))
    assert kernel_inception_distance(a, b, subsets=5, subset_size=30, seed=7) == kernel_inception_distance(
        a, b, subsets=5, subset_size=30, seed=7
    )
    # subset_size is capped at the smaller set
    assert kernel_inception_distance(a, b, subsets=2, subset_size=1000)[0] == pytest.approx(
        kernel_inception_distance(a, b, subsets=2, subset_size=80)[0]
    )


def test_fid_kid_pipeline_with_random_features_separates_distributions():
    extractor = RandomFeatureExtractor(spatial_dims=2, in_channels=1, feature_dim=16)
    real = _smooth_images(120, (32, 32), seed=0)
    same = _smooth_images(120, (32, 32), seed=1)
    brighter = _smooth_images(120, (32, 32), seed=2) * 0.5 + 0.5
    f_real, f_same, f_bright = (extract_features(extractor, x, batch_size=64) for x in (real, same, brighter))
    assert frechet_distance(f_same, f_real) < frechet_distance(f_bright, f_real) / 10
    kid_same = kernel_inception_distance(f_same, f_real, subsets=20, subset_size=100)[0]
    kid_bright = kernel_inception_distance(f_bright, f_real, subsets=20, subset_size=100)[0]
    assert kid_same < kid_bright / 10


# --- diversity -------------------------------------------------------------------------------------------------------


def test_ms_ssim_scales_follow_the_image_size():
    sizes = (11, 21, 22, 43, 44, 98, 99, 175, 176, 256)
    assert [ms_ssim_scales((s, s)) for s in sizes] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert ms_ssim_scales((256, 256, 32)) == 2  # the smallest side decides
    assert ms_ssim_scales((16, 16), kernel_size=7) == 2
    with pytest.raises(ValueError, match=r"kernel_size=11.*\(8, 8\)"):
        ms_ssim_scales((8, 8))


@pytest.mark.parametrize("spatial_dims, size", [(2, 48), (3, 24)])
def test_ms_ssim_diversity_is_higher_for_near_duplicates(spatial_dims, size):
    base = _smooth_images(1, (size,) * spatial_dims, seed=0)
    near_duplicates = base + 0.02 * torch.randn(6, *base.shape[1:], generator=_generator(1))
    independent = torch.rand(6, *base.shape[1:], generator=_generator(2))
    result = ms_ssim_diversity(near_duplicates, 1.0, spatial_dims, reference=independent)
    assert result.num_scales == ms_ssim_scales((size,) * spatial_dims)
    assert result.samples > 0.8
    assert result.reference < 0.2
    assert ms_ssim_diversity(independent, 1.0, spatial_dims).reference is None


def test_paired_fidelity_is_perfect_for_copies_and_measures_a_known_offset():
    reference = _smooth_images(3, (64, 64), seed=4)
    same = paired_fidelity(reference, reference.clone())
    assert same["mae"]["mean"] == same["mse"]["mean"] == 0.0 and same["ms_ssim"]["mean"] == pytest.approx(1.0)
    assert same["ms_ssim_scales"] == 3 and len(same["mae"]["per_pair"]) == 3
    shifted = paired_fidelity((reference + 0.1).clamp(max=1.0), reference)
    inside = reference <= 0.9  # where the shift is not clipped
    assert shifted["mae"]["mean"] <= 0.1 + 1e-6 and shifted["mae"]["mean"] > 0.1 * inside.float().mean().item() - 1e-6
    assert shifted["rmse"]["mean"] == pytest.approx(np.mean(np.sqrt(shifted["mse"]["per_pair"])), rel=1e-5)
    noisy = paired_fidelity((reference + 0.3 * torch.rand_like(reference)).clamp(0, 1), reference)
    assert noisy["ms_ssim"]["mean"] < shifted["ms_ssim"]["mean"] < 1.0
    with pytest.raises(ValueError):
        paired_fidelity(reference, reference[:2])


def test_ms_ssim_diversity_pair_sampling():
    images = _smooth_images(10, (32, 32), seed=3)
    all_pairs = ms_ssim_diversity(images, 1.0, 2, pair_batch_size=7).samples
    sampled = ms_ssim_diversity(images, 1.0, 2, n_pairs=200, seed=0).samples
    assert sampled == ms_ssim_diversity(images, 1.0, 2, n_pairs=200, seed=0).samples
    assert sampled == pytest.approx(all_pairs, abs=0.05)
    with pytest.raises(ValueError, match=r"\(1, 1, 32, 32\)"):
        ms_ssim_diversity(images[:1], 1.0, 2)
    with pytest.raises(ValueError, match=r"\(10, 1, 32, 32\).*\(4, 1, 32, 31\)"):
        ms_ssim_diversity(images, 1.0, 2, reference=torch.rand(4, 1, 32, 31))


# --- memorisation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["mse", "correlation"])
def test_copies_have_zero_distance_and_point_at_the_copied_images(metric):
    train = torch.rand(300, 1, 12, 12, generator=_generator(0))
    copied = torch.tensor([17, 250, 3, 128, 17])
    samples = train[copied]
    if metric == "correlation":
        samples = 2.0 * samples + 0.5  # a positive linear intensity change keeps the correlation at 1
    distances, indices = nearest_neighbour_distances(samples, train, metric=metric, chunk_size=64)
    assert torch.allclose(distances, torch.zeros(5, dtype=torch.float64), atol=1e-10)
    assert torch.equal(indices, copied)


@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_patch_max_check_flags_copies_and_noisy_copies_but_not_new_images(spatial):
    train = torch.rand(40, 1, *spatial, generator=_generator(0)) * 0.8 + 0.1
    noisy = (train[[5, 9]] + 0.01 * torch.randn(2, 1, *spatial, generator=_generator(1))).clamp(0, 1)
    fresh = torch.rand(6, 1, *spatial, generator=_generator(2))
    samples = torch.cat([train[[3]], noisy, fresh])
    report = memorisation_check(samples, train, chunk_size=16)
    distances = torch.tensor(report["distances"])
    assert distances[0] == pytest.approx(0.0, abs=1e-6) and report["nearest_index"][:3] == [3, 5, 9]
    assert bool((distances[1:3] <= 0.15).all()) and bool((distances[3:] > 0.3).all())
    assert report["patch_max"]["flagged_count"] == 3 and report["patch_max"]["flagged_fraction"] == pytest.approx(3 / 9)
    assert bool(((distances >= 0) & (distances <= 1)).all())


def test_patch_max_is_at_least_the_whole_image_normalised_distance():
    samples, train = _smooth_images(10, (32, 32), 3), _smooth_images(25, (32, 32), 4)
    patch_max, indices = nearest_neighbour_distances(samples, train, metric="patch_max")
    whole = (samples - train[indices]).flatten(1).double().norm(dim=1) / math.sqrt(samples[0].numel())
    assert bool((patch_max >= whole - 1e-12).all())


def test_a_copied_corner_is_caught_by_its_patch():
    """A sample identical to a training image except one tile: the tile decides the patch-max distance."""
    train = _smooth_images(5, (32, 32), 5)
    sample = train[[2]].clone()
    sample[..., :8, :8] += 0.1
    distance, index = nearest_neighbour_distances(sample, train, metric="patch_max")
    expected = (sample - train[[2]])[..., :8, :8].double().norm() / 8
    assert index.item() == 2 and distance.item() == pytest.approx(expected.item())


def test_memorisation_check_reports_cosine_neighbours_in_feature_space():
    train, samples = torch.rand(12, 1, 8, 8, generator=_generator(6)), torch.rand(3, 1, 8, 8, generator=_generator(7))
    train_features = torch.randn(12, 5, generator=_generator(8))
    sample_features = 3.0 * train_features[[4, 7, 1]]  # scaled copies: cosine distance 0
    report = memorisation_check(samples, train, sample_features=sample_features, train_features=train_features)
    assert report["cosine"]["nearest_index"] == [4, 7, 1]
    assert max(report["cosine"]["distances"]) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="one feature row per image"):
        memorisation_check(samples, train, sample_features=sample_features[:2], train_features=train_features)
    with pytest.raises(ValueError, match="or neither"):
        memorisation_check(samples, train, sample_features=sample_features)


def test_memorisation_gallery_pairs_the_closest_samples_with_their_neighbours(tmp_path):
    train = _smooth_images(6, (32, 32), 9)
    samples = torch.cat([train[[4]], _smooth_images(3, (32, 32), 10)])
    report = memorisation_check(samples, train)
    distances, nearest = report["distances"], report["nearest_index"]
    path = save_memorisation_gallery(samples, train, distances, nearest, tmp_path / "g.png", count=2)
    image = np.asarray(Image.open(path))
    assert image.shape[0] > image.shape[1] / 2  # two rows (samples over neighbours) of two columns


def test_nearest_neighbours_match_brute_force_for_any_chunk_size():
    train = torch.rand(130, 1, 6, 6, 6, generator=_generator(0))
    samples = torch.rand(70, 1, 6, 6, 6, generator=_generator(1))
    brute = torch.cdist(samples.flatten(1).double(), train.flatten(1).double()).square() / 216
    expected_distances, expected_indices = brute.min(dim=1)
    for chunk_size in (1, 16, 1000):
        distances, indices = nearest_neighbour_distances(samples, train, chunk_size=chunk_size)
        assert torch.allclose(distances, expected_distances, rtol=1e-9)
        assert torch.equal(indices, expected_indices)


def test_memorisation_ratio_flags_copies_but_not_fresh_draws():
    train = torch.rand(400, 1, 16, 16, generator=_generator(0))
    holdout = torch.rand(100, 1, 16, 16, generator=_generator(1))
    fresh = torch.rand(100, 1, 16, 16, generator=_generator(2))
    near_copies = train[:100] + 0.01 * torch.randn(100, 1, 16, 16, generator=_generator(3))
    assert memorisation_ratio(near_copies, train, holdout) < 0.01
    assert memorisation_ratio(fresh, train, holdout) == pytest.approx(1.0, abs=0.05)
    assert memorisation_ratio(fresh, train, holdout, metric="correlation") == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="undefined"):
        memorisation_ratio(fresh, train, train[:50])


def test_memorisation_rejects_bad_shapes_and_metrics():
    train = torch.rand(10, 1, 8, 8)
    with pytest.raises(ValueError, match=r"\(4, 1, 8, 9\).*\(10, 1, 8, 8\)"):
        nearest_neighbour_distances(torch.rand(4, 1, 8, 9), train)
    with pytest.raises(ValueError, match=r"\(3, 1, 7, 8\).*\(10, 1, 8, 8\)"):
        memorisation_ratio(torch.rand(4, 1, 8, 8), train, torch.rand(3, 1, 7, 8))
    with pytest.raises(ValueError, match="one of \\['mse', 'correlation', 'patch_max'\\].*'cosine'"):
        nearest_neighbour_distances(torch.rand(4, 1, 8, 8), train, metric="cosine")
