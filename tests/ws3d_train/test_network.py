"""The sparse U-Net: output shapes, backward, row-permutation equivariance, config presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ws3d_train.network import DECODER_STRIDES, PRESETS, MinkUNet, NetworkConfig, NetworkOutput, ancestor_rows, build_network
from ws3d_train.sparse import SparseTensor, collate_sparse
from ws3d_train.sparse import backend_runs_on, spconv_backend


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors gain nothing from threads


def _tiny_scene(seed: int, n_per_scene: int = 600, batches: int = 2, in_channels: int = 6) -> SparseTensor:
    """Random surface-like voxels: a floor and a wall of a small room per scene, plus noise voxels."""
    g = torch.Generator().manual_seed(seed)
    scenes, feats = [], []
    for _ in range(batches):
        a = torch.randint(0, 40, (n_per_scene, 2), generator=g)
        on_wall = torch.rand(n_per_scene, generator=g) < 0.4
        xyz = torch.stack([a[:, 0], torch.where(on_wall, 0, a[:, 1]), torch.where(on_wall, a[:, 1] % 20, 0)], 1)
        xyz = torch.unique(xyz, dim=0)
        scenes.append(xyz)
        feats.append(torch.randn(xyz.shape[0], in_channels, generator=g))
    return collate_sparse(scenes, feats)


@pytest.fixture(scope="module")
def tiny_config() -> NetworkConfig:
    return NetworkConfig(preset="tiny", num_classes=7, clip_dim=24, backend="torch")


def test_forward_shapes_and_backward(tiny_config: NetworkConfig) -> None:
    torch.manual_seed(0)
    net = build_network(tiny_config)
    x = _tiny_scene(1)
    out = net(x)
    n = x.num_voxels
    assert isinstance(out, NetworkOutput)
    assert out.semantic.shape == (n, 7)
    assert out.clip.shape == (n, 24)
    assert out.boundary.shape == (n,)
    assert out.feats.shape == (n, net.out_channels) and net.out_channels == 32
    assert all(torch.isfinite(t).all() for t in (out.semantic, out.clip, out.boundary, out.feats))
    assert len(out.region) == len(out.stage_index) == len(DECODER_STRIDES) == 4
    assert out.region[-1].shape == (n, tiny_config.region_dim) and all(i.shape == (n,) for i in out.stage_index)
    assert [r.shape[0] for r in out.region] == sorted(r.shape[0] for r in out.region)  # coarse stages have fewer voxels
    loss = out.semantic.logsumexp(1).mean() + out.clip.square().mean() + out.boundary.sigmoid().mean()
    loss = loss + sum(r.square().mean() for r in out.region)
    loss.backward()
    no_grad = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    assert net.stem[0].weight.grad.abs().sum() > 0 and net.down[3][0].weight.grad.abs().sum() > 0


def test_permuting_input_rows_permutes_outputs(tiny_config: NetworkConfig) -> None:
    torch.manual_seed(1)
    net = build_network(tiny_config)
    x = _tiny_scene(2)
    perm = torch.randperm(x.num_voxels, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = net(x)
        b = net(x.permute_rows(perm))
    for name in ("semantic", "clip", "boundary", "feats"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name)[perm], atol=1e-5, rtol=1e-5)
    for k in range(4):  # each voxel's ancestor features at every stage follow it
        torch.testing.assert_close(b.region[k][b.stage_index[k]], a.region[k][a.stage_index[k]][perm], atol=1e-5, rtol=1e-5)


def test_stage_index_points_at_each_voxels_ancestor(tiny_config: NetworkConfig) -> None:
    torch.manual_seed(5)
    net = build_network(tiny_config)
    x = _tiny_scene(6)
    seen: dict[int, torch.Tensor] = {}

    def keep(stride):  # the coordinates of each decoder stage's output
        return lambda module, inputs, output: seen.__setitem__(stride, output.coords)

    for stage, stride in zip(net.decoder, DECODER_STRIDES):
        stage.register_forward_hook(keep(stride))
    with torch.no_grad():
        out = net(x)
    for k, stride in enumerate(DECODER_STRIDES):
        ancestor = seen[stride][out.stage_index[k]].long()
        expected = x.coords.long().clone()
        expected[:, 1:] = torch.div(expected[:, 1:], stride, rounding_mode="floor") * stride
        assert torch.equal(ancestor, expected), stride
    with pytest.raises(ValueError, match="no ancestor"):
        ancestor_rows(x.coords, seen[8][1:], 8)


def test_linear_boundary_head_is_kept_for_comparison(tiny_config: NetworkConfig) -> None:
    torch.manual_seed(3)
    linear = build_network(dataclasses.replace(tiny_config, boundary_head="linear"))
    assert isinstance(linear.boundary_head, torch.nn.Linear)
    assert linear(_tiny_scene(7)).boundary.shape == (_tiny_scene(7).num_voxels,)
    with pytest.raises(ValueError, match="boundary_head"):
        NetworkConfig(boundary_head="deep")


def test_scenes_in_a_batch_do_not_interact_in_eval_mode(tiny_config: NetworkConfig) -> None:
    """With running statistics (eval), a scene's outputs do not depend on the other scenes."""
    torch.manual_seed(2)
    net = build_network(tiny_config).eval()
    both = _tiny_scene(4, batches=2)
    first_rows = both.coords[:, 0] == 0
    alone = SparseTensor(both.feats[first_rows], both.coords[first_rows])
    with torch.no_grad():
        a = net(both).semantic[first_rows]
        b = net(alone).semantic
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_config_presets_and_overrides() -> None:
    r18 = NetworkConfig().resolved()
    assert r18.preset == "MinkUNet18" and r18.layers == (2,) * 8 and r18.planes == PRESETS["MinkUNet18"].planes
    r34 = NetworkConfig(preset="MinkUNet34").resolved()
    assert r34.layers == (2, 3, 4, 6, 2, 2, 2, 2)
    custom = NetworkConfig(preset="tiny", planes=[8, 8, 8, 8, 8, 8, 8, 8]).resolved()
    assert custom.planes == (8,) * 8 and custom.layers == PRESETS["tiny"].layers
    with pytest.raises(dataclasses.FrozenInstanceError):
        custom.num_classes = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="preset"):
        NetworkConfig(preset="MinkUNet99")
    with pytest.raises(ValueError, match="8 values"):
        NetworkConfig(planes=(1, 2, 3))


@pytest.mark.parametrize("preset", ["MinkUNet14", "MinkUNet18", "MinkUNet34"])
def test_standard_presets_build_with_the_expected_depth(preset: str) -> None:
    net = MinkUNet(NetworkConfig(preset=preset, num_classes=20, clip_dim=512))
    n_blocks = sum(len(stage) for stage in list(net.encoder) + list(net.decoder))
    assert n_blocks == sum(PRESETS[preset].layers)
    assert net.stem[0].kernel_size == 5 and net.out_channels == 96
    n_params = sum(p.numel() for p in net.parameters())
    assert 10e6 < n_params < 60e6  # MinkUNet14..34: roughly 20 to 40 M parameters


def test_wrong_input_channels_raise(tiny_config: NetworkConfig) -> None:
    net = build_network(tiny_config)
    x = _tiny_scene(5, in_channels=3)
    with pytest.raises(ValueError, match="6 feature channels"):
        net(x)


@pytest.mark.skipif(not spconv_backend.is_available(), reason="spconv not importable (pip install spconv)")
def test_network_gives_the_same_outputs_and_gradients_on_spconv(tiny_config: NetworkConfig) -> None:
    """The whole U-Net (subm 3, stem, stride-2 down, transposed up, 1x1 heads) on both backends,
    same weights, float64: outputs and every parameter's gradient agree."""
    torch.manual_seed(4)
    ref = build_network(tiny_config).double()
    other = build_network(dataclasses.replace(tiny_config, backend="spconv")).double()
    other.load_state_dict(ref.state_dict())
    x = _tiny_scene(5)
    x = SparseTensor(x.feats.double(), x.coords)
    outs = []
    for net in (ref, other):
        out = net(SparseTensor(x.feats, x.coords))
        (out.semantic.square().mean() + out.clip.sin().mean() + out.boundary.mean()
         + sum(r.tanh().mean() for r in out.region)).backward()
        outs.append(out)
    for name in ("semantic", "clip", "boundary"):
        torch.testing.assert_close(getattr(outs[1], name), getattr(outs[0], name), atol=1e-9, rtol=1e-9)
    for k in range(4):  # coarse rows may come in another order: compare each voxel's ancestor
        a, b = outs[0].region[k][outs[0].stage_index[k]], outs[1].region[k][outs[1].stage_index[k]]
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9)
    for (name, p), q in zip(ref.named_parameters(), other.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, atol=1e-9, rtol=1e-7, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "spconv", "torchsparse"])
def test_network_on_cuda_matches_the_cpu_network(tiny_config: NetworkConfig, backend: str) -> None:
    """The U-Net on CUDA (each backend that runs there) against the CPU torch backend, same weights;
    then one bf16-autocast forward + backward gives finite gradients everywhere."""
    if not backend_runs_on(backend, "cuda"):
        pytest.skip(f"sparse backend {backend!r} does not run on CUDA here")
    torch.manual_seed(6)
    ref = build_network(tiny_config).eval()
    net = build_network(dataclasses.replace(tiny_config, backend=backend))
    net.load_state_dict(ref.state_dict())
    net = net.cuda().eval()
    x = _tiny_scene(7)
    with torch.no_grad():
        a = ref(x)
        b = net(x.to("cuda"))
    for name in ("semantic", "clip", "boundary"):
        torch.testing.assert_close(getattr(b, name).cpu(), getattr(a, name), atol=2e-3, rtol=2e-3)
    net.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x.to("cuda"))
    (out.semantic.float().square().mean() + out.clip.float().mean() + out.boundary.float().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
