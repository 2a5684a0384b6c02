"""The maths of warp_ray.merge, pinned by the properties the papers state."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warp_ray.errors import MergeError
from warp_ray.merge import average, ema_update_, liti, slerp, slerp_coefficients
from warp_ray.merge.soup import simplex_grid, slerp_soup, soup
from warp_ray.merge.task_vectors import gram, row_spans


def state(**tensors):
    return {k: torch.as_tensor(v) for k, v in tensors.items()}


def orthogonal_pair(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two orthogonal vectors of equal norm (the RL task vectors of the paper, Omega = 90 deg)."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(n, generator=g), torch.randn(n, generator=g)
    v -= (v @ u) / (u @ u) * u
    return u, v * (u.norm() / v.norm())


def paper_slerp(init, d1, d2, lam):
    """The paper's formula for M = 2, written out independently of the library."""
    omega = torch.arccos(d1 @ d2 / (d1.norm() * d2.norm()))
    return init + torch.sin((1 - lam) * omega) / torch.sin(omega) * d1 + torch.sin(lam * omega) / torch.sin(omega) * d2


def test_endpoint_weights_return_the_models_exactly():
    init, a, b = state(w=torch.randn(5)), state(w=torch.randn(5)), state(w=torch.randn(5))
    assert torch.equal(slerp(init, [a, b], weights=(1, 0))["w"], a["w"])
    assert torch.equal(slerp(init, [a, b], weights=(0, 1))["w"], b["w"])
    assert torch.equal(average([a, b], weights=(1, 0))["w"], a["w"])
    assert torch.equal(average([a, b], weights=(0, 1))["w"], b["w"])
    assert torch.equal(slerp(init, [a])["w"], a["w"])


@pytest.mark.parametrize("lam", [0.2, 0.5, 0.7])
def test_slerp_matches_the_paper_formula_at_any_angle(lam):
    g = torch.Generator().manual_seed(3)
    init, d1, d2 = (torch.randn(64, generator=g, dtype=torch.float64) for _ in range(3))
    d2 = d2 + 0.8 * d1  # an angle well away from 90 degrees
    merged = slerp({"w": init}, [{"w": init + d1}, {"w": init + d2}], weights=(1 - lam, lam))["w"]
    assert torch.allclose(merged, paper_slerp(init, d1, d2, lam), atol=1e-12)


def test_slerp_keeps_the_norm_of_orthogonal_task_vectors_and_lerp_shrinks_it():
    u, v = orthogonal_pair()
    init = torch.randn(1000)
    models = [{"w": init + u}, {"w": init + v}]
    slerped = slerp({"w": init}, models)["w"] - init
    lerped = average(models)["w"] - init
    assert slerped.norm() == pytest.approx(u.norm().item(), rel=1e-4)
    assert lerped.norm() == pytest.approx(u.norm().item() / math.sqrt(2), rel=1e-4)
    # the slerp direction is the bisector, the same as lerp's
    assert torch.allclose(slerped / slerped.norm(), lerped / lerped.norm(), atol=1e-5)


@pytest.mark.parametrize("factor", [2.0, -1.0, 1.0 + 1e-9])
def test_colinear_task_vectors_fall_back_to_linear_interpolation(factor):
    d = torch.randn(50, dtype=torch.float64)
    merged = slerp({"w": torch.zeros(50, dtype=torch.float64)}, [{"w": d}, {"w": factor * d}], weights=(0.6, 0.4))["w"]
    assert torch.allclose(merged, 0.6 * d + 0.4 * factor * d)
    assert torch.isfinite(merged).all()


def test_a_zero_task_vector_is_linear_not_shrunk_by_the_angle_formula():
    init, d = torch.randn(20), torch.randn(20)
    merged = slerp({"w": init}, [{"w": init + d}, {"w": init.clone()}], weights=(0.7, 0.3))["w"]
    assert torch.allclose(merged, init + 0.7 * d, atol=1e-6)
    both_zero = slerp({"w": init}, [{"w": init.clone()}, {"w": init.clone()}])["w"]
    assert torch.equal(both_zero, init)


def test_three_models_equal_the_explicit_two_step_recursion():
    g = torch.Generator().manual_seed(0)
    init = {"w": torch.randn(300, generator=g, dtype=torch.float64)}
    a, b, c = ({"w": init["w"] + torch.randn(300, generator=g, dtype=torch.float64)} for _ in range(3))
    two = slerp(init, [a, b])  # lambda = 1/2
    explicit = slerp(init, [two, c], weights=(2 / 3, 1 / 3))  # lambda = 1/3
    assert torch.allclose(slerp(init, [a, b, c])["w"], explicit["w"], atol=1e-12)
    # weighted: lambda_m = w_m / (w_1 + ... + w_m)
    w = (0.5, 0.2, 0.3)
    first = slerp(init, [a, b], weights=(0.5 / 0.7, 0.2 / 0.7))
    assert torch.allclose(
        slerp(init, [a, b, c], weights=w)["w"], slerp(init, [first, c], weights=(0.7, 0.3))["w"], atol=1e-12
    )


def test_coefficient_form_rebuilds_slerp_from_the_gram_matrix_alone():
    g = torch.Generator().manual_seed(1)
    init = torch.randn(40, 30, generator=g)
    thetas = [init + torch.randn(40, 30, generator=g) for _ in range(4)]
    deltas = torch.stack([t - init for t in thetas]).reshape(4, -1)
    g = deltas @ deltas.T
    c = slerp_coefficients(g, weights=(0.1, 0.2, 0.3, 0.4))
    rebuilt = init + sum(c_m.item() * (t - init) for c_m, t in zip(c, thetas))
    merged = slerp({"w": init}, [{"w": t} for t in thetas], weights=(0.1, 0.2, 0.3, 0.4))["w"]
    assert torch.allclose(merged, rebuilt, atol=1e-5)
    # orthonormal pair at lambda = 1/2: both coefficients are sin(45 deg)
    assert torch.allclose(slerp_coefficients(torch.eye(2)), torch.full((2,), math.sqrt(0.5), dtype=torch.float64))
    # only angles and norm ratios matter: scaling the Gram matrix changes nothing
    assert torch.allclose(slerp_coefficients(g * 1e6), slerp_coefficients(g))


def test_chunked_gram_equals_the_whole_tensor_gram():
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(3000, 200, generator=g) for _ in range(3)]  # several chunks of rows
    spans = row_spans(tensors[0].shape)
    assert len(spans) > 1
    deltas = torch.stack([(t - tensors[0]).reshape(-1) for t in tensors[1:]]).double()
    assert torch.allclose(gram(lambda a, b: [t[a:b] for t in tensors], spans), deltas @ deltas.T, rtol=1e-5)


def test_liti_endpoints_and_midpoints():
    init, merged = state(w=torch.randn(8)), state(w=torch.randn(8))
    assert torch.equal(liti(init, merged, 0.0)["w"], init["w"])
    assert torch.equal(liti(init, merged, 1.0)["w"], merged["w"])
    assert torch.allclose(liti(init, merged, 0.3)["w"], 0.7 * init["w"] + 0.3 * merged["w"])
    for eta in (-0.1, 1.5, float("nan")):
        with pytest.raises(MergeError, match=r"eta = .* allowed range \[0, 1\]"):
            liti(init, merged, eta)


def test_ema_update_fixed_point_rate_and_buffers():
    policy = {"w": torch.randn(10), "steps": torch.tensor([3])}
    ema = {"w": policy["w"].clone(), "steps": torch.tensor([0])}
    ema_update_(ema, policy, 0.01)
    assert torch.equal(ema["w"], policy["w"])  # the policy is a fixed point
    assert ema["steps"].item() == 0  # integer buffers are never averaged
    start = torch.zeros(10)
    ema = {"w": start.clone(), "steps": torch.tensor([0])}
    ema_update_(ema, policy, 0.25)
    assert torch.allclose(ema["w"], 0.75 * start + 0.25 * policy["w"])
    for _ in range(2000):
        ema_update_(ema, policy, 0.01)
    assert torch.allclose(ema["w"], policy["w"], atol=1e-6)  # converges to a fixed policy
    with pytest.raises(MergeError, match="mu = 2"):
        ema_update_(ema, policy, 2)


def test_ema_in_float32_follows_a_bf16_policy():
    policy = {"w": torch.randn(10).to(torch.bfloat16)}
    ema = {"w": torch.zeros(10)}
    ema_update_(ema, policy, 0.01)
    assert ema["w"].dtype == torch.float32
    assert torch.allclose(ema["w"], 0.01 * policy["w"].float())


def test_bf16_inputs_are_merged_in_float32_and_returned_in_bf16():
    g = torch.Generator().manual_seed(2)
    init = torch.randn(256, generator=g).to(torch.bfloat16)
    a = (init.float() + 0.01 * torch.randn(256, generator=g)).to(torch.bfloat16)
    b = (init.float() + 0.01 * torch.randn(256, generator=g)).to(torch.bfloat16)
    merged = slerp({"w": init}, [{"w": a}, {"w": b}])["w"]
    assert merged.dtype == torch.bfloat16
    reference = slerp({"w": init.float()}, [{"w": a.float()}, {"w": b.float()}])["w"].to(torch.bfloat16)
    assert torch.equal(merged, reference)
    assert average([{"w": a}, {"w": b}])["w"].dtype == torch.bfloat16
    assert liti({"w": init}, {"w": a}, 0.5)["w"].dtype == torch.bfloat16


def test_integer_and_bool_tensors_are_copied_from_init():
    init = state(w=torch.zeros(3), ids=torch.arange(3), mask=torch.tensor([True, False, True]))
    other = state(w=torch.ones(3), ids=torch.arange(3) + 10, mask=torch.tensor([False, False, False]))
    for merged in (slerp(init, [other, other]), liti(init, other, 0.5)):
        assert torch.equal(merged["ids"], init["ids"]) and torch.equal(merged["mask"], init["mask"])
    assert torch.equal(average([init, other])["ids"], init["ids"])


@pytest.mark.parametrize(
    "other, message",
    [
        ({"w": torch.zeros(3)}, r"missing from model 1: 'v'"),
        ({"w": torch.zeros(3), "v": torch.zeros(2), "x": torch.zeros(1)}, r"only in model 1: 'x'"),
        ({"w": torch.zeros(4), "v": torch.zeros(2)}, r"tensor 'w': shape \[4\] in model 1, \[3\] in init"),
        (
            {"w": torch.zeros(3, dtype=torch.float16), "v": torch.zeros(2)},
            r"tensor 'w': dtype torch.float16 in model 1",
        ),
    ],
)
def test_mismatched_models_raise_naming_the_tensor(other, message):
    init = {"w": torch.zeros(3), "v": torch.zeros(2)}
    with pytest.raises(MergeError, match=message):
        slerp(init, [other])


def test_a_model_on_another_device_is_refused_naming_the_tensor():
    """The meta device stands in for a GPU: a merge computes where its inputs are, all on one device."""
    init = {"w": torch.zeros(3), "v": torch.zeros(2)}
    elsewhere = {"w": torch.zeros(3), "v": torch.zeros(2, device="meta")}
    for merge, message in (
        (lambda: slerp(init, [elsewhere]), "tensor 'v': on meta in model 1, cpu in init"),
        (lambda: liti(init, elsewhere, 0.5), "tensor 'v': on meta in merged, cpu in init"),
        (lambda: average([init, elsewhere]), "tensor 'v': on meta in model 2, cpu in model 1"),
        (lambda: ema_update_(init, elsewhere, 0.1), "tensor 'v': on meta in policy, cpu in ema"),
    ):
        with pytest.raises(MergeError, match=message):
            merge()


def test_a_gpu_merges_in_chunks_a_hundred_times_larger_than_the_cpu_caches():
    shape = (11008, 4096)  # a 7B model's MLP weight: 172 chunks on the CPU, 2 on a GPU
    cpu, gpu = row_spans(shape), row_spans(shape, "cuda")
    assert len(cpu) == math.ceil(11008 / ((1 << 18) // 4096)) and len(gpu) == 2
    for spans in (cpu, gpu):  # every row once, in order
        assert [a for a, _ in spans] == [0, *(b for _, b in spans[:-1])] and spans[-1][1] == 11008


@pytest.mark.parametrize("weights", [(1.0,), (0.5, -0.5), (0.0, 0.0), (float("nan"), 1.0)])
def test_invalid_weights_raise(weights):
    sd = {"w": torch.zeros(2)}
    with pytest.raises(MergeError, match="weight"):
        slerp(sd, [sd, sd], weights=weights)
    with pytest.raises(MergeError, match="weight"):
        average([sd, sd], weights=weights)


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda m: st.tuples(
            st.lists(st.lists(finite, min_size=3, max_size=3), min_size=m + 1, max_size=m + 1),
            st.one_of(st.none(), st.lists(st.floats(0.0, 10.0), min_size=m, max_size=m).filter(lambda w: sum(w) > 0)),
        )
    )
)
def test_no_nan_for_any_finite_input(case):
    rows, weights = case
    init, *models = ({"w": torch.tensor(r, dtype=torch.float32)} for r in rows)
    merged = slerp(init, models, weights=weights)["w"]
    assert not torch.isnan(merged).any()


def test_a_rewarded_soup_serves_each_policy_at_its_vertex_and_their_interpolation_between():
    g = torch.Generator().manual_seed(4)
    init, a, b = (state(w=torch.randn(6, generator=g), n=torch.tensor([3])) for _ in range(3))
    assert torch.equal(soup([a, b], (1, 0))["w"], a["w"]) and torch.equal(soup([a, b], (0, 1))["w"], b["w"])
    assert torch.equal(slerp_soup(init, [a, b], (1, 0))["w"], a["w"])
    assert torch.equal(slerp_soup(init, [a, b], (0, 1))["w"], b["w"])
    torch.testing.assert_close(soup([a, b], (0.3, 0.7))["w"], 0.3 * a["w"] + 0.7 * b["w"])
    lam = 0.7
    d1, d2 = a["w"].double() - init["w"].double(), b["w"].double() - init["w"].double()
    expected = paper_slerp(init["w"].double(), d1, d2, lam).float()
    torch.testing.assert_close(slerp_soup(init, [a, b], (1 - lam, lam))["w"], expected)
    three = soup([a, b, init], (0.2, 0.3, 0.5))["w"]
    torch.testing.assert_close(three, 0.2 * a["w"] + 0.3 * b["w"] + 0.5 * init["w"])


@pytest.mark.parametrize(
    "lambdas, message",
    [
        ((0.5,), "got 1 lambdas for 2 policies"),
        ((1.2, -0.2), "lambda_2 = -0.2 must be a finite number >= 0"),
        ((float("nan"), 1.0), "lambda_1 = nan must be a finite number >= 0"),
        ((0.5, 0.6), "sum to 1.1: they must sum to 1"),
        ((0.5, 0.5002), "sum to 1.0002: they must sum to 1"),
        ((2.0, 2.0), "sum to 4: they must sum to 1"),  # a merge's weights would be rescaled; a trade-off is not
    ],
)
def test_a_soup_refuses_lambdas_off_the_simplex(lambdas, message):
    a, b = state(w=torch.zeros(2)), state(w=torch.ones(2))
    with pytest.raises(MergeError, match=re.escape(message)):
        soup([a, b], lambdas)
    with pytest.raises(MergeError, match="at least one policy"):
        soup([], [])
    thirds = soup([a, b, b], (0.3333, 0.3333, 0.3333))["w"]  # typed thirds: within the tolerance, and rescaled
    torch.testing.assert_close(thirds, torch.full((2,), 2 / 3))


def test_the_soups_grid_covers_the_simplex_in_steps_of_one_over_grid():
    two = simplex_grid(2, 10)
    assert len(two) == 11 and two[0] == (1.0, 0.0) and two[-1] == (0.0, 1.0)
    assert [b for _, b in two] == pytest.approx([k / 10 for k in range(11)])
    three = simplex_grid(3, 10)
    assert len(three) == math.comb(12, 2) and len(set(three)) == len(three)  # 66 compositions of 10 into 3
    assert all(math.isclose(sum(p), 1.0) and min(p) >= 0 for p in three)
    assert simplex_grid(2, 4, interior=True) == [(0.75, 0.25), (0.5, 0.5), (0.25, 0.75)]
    assert simplex_grid(3, 4, interior=True) == [(0.5, 0.25, 0.25), (0.25, 0.5, 0.25), (0.25, 0.25, 0.5)]
    assert simplex_grid(3, 2, interior=True) == [] and simplex_grid(2, 0, interior=True) == []
