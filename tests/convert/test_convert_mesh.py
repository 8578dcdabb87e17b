"""Conversion straight into a mesh's shardings (8 fake CPU devices): every leaf comes out in the
rules table's sharding, and the written checkpoint equals the unsharded conversion, also where
Orbax lacks its partial-save API."""

import os

import jax
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint
from mixtral_jax.convert import importer, open_source, write_hf
from mixtral_jax.convert.cli import main as convert_main
from mixtral_jax.parallel import sharding

CFG = mj.ModelConfig.tiny(
    vocab_size=48,
    embed_dim=16,
    hidden_dim=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    num_experts=4,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "hf"
    params = checkpoint.to_numpy(mj.get_params(mj.init(CFG, 2)))
    write_hf(params, CFG, str(path), progress=False)
    return str(path)


@pytest.mark.parametrize("spec", ["expert=4,data=2", "fsdp=2,tensor=2,expert=2"])
def test_leaves_are_created_in_their_target_sharding(hf_dir, spec):
    mesh = sharding.make_mesh(sharding.MeshConfig.parse(spec))
    want = sharding.param_shardings(mj.param_shapes(CFG), mesh)
    plain = importer.build_params(open_source(hf_dir), progress=False)
    for path, leaf in importer.iter_sharded_leaves(open_source(hf_dir), mesh):
        target, ref = want, plain
        for name in path:
            target, ref = target[name], ref[name]
        assert leaf.sharding.is_equivalent_to(target, leaf.ndim), path
        assert np.array_equal(np.asarray(leaf), ref), path
    assert any(
        not leaf.sharding.is_fully_replicated
        for _, leaf in importer.iter_sharded_leaves(open_source(hf_dir), mesh)
    )


def test_sharded_conversion_writes_the_same_checkpoint(hf_dir, tmp_path):
    assert (
        convert_main(
            ["to-orbax", hf_dir, str(tmp_path / "sharded"), "--quiet", "--mesh", "expert=4,data=2"]
        )
        == 0
    )
    assert convert_main(["to-orbax", hf_dir, str(tmp_path / "plain"), "--quiet"]) == 0
    _, a = checkpoint.load_model(str(tmp_path / "sharded"))
    _, b = checkpoint.load_model(str(tmp_path / "plain"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert sorted(os.listdir(tmp_path)) == ["plain", "sharded"]


def test_without_orbax_partial_saves_the_sharded_leaves_are_saved_together(
    hf_dir, tmp_path, monkeypatch
):
    import sys

    from orbax.checkpoint.experimental import v1

    monkeypatch.delattr(v1, "partial", raising=False)
    monkeypatch.setitem(sys.modules, "orbax.checkpoint.experimental.v1.partial", None)
    with pytest.raises(ImportError):
        from orbax.checkpoint.experimental.v1 import partial  # noqa: F401
    assert (
        convert_main(
            ["to-orbax", hf_dir, str(tmp_path / "sharded"), "--quiet", "--mesh", "expert=4,data=2"]
        )
        == 0
    )
    _, got = checkpoint.load_model(str(tmp_path / "sharded"))
    want = importer.build_params(open_source(hf_dir), progress=False)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.array_equal(np.asarray(x), y)
    assert sorted(os.listdir(tmp_path)) == ["sharded"]


def test_a_mesh_that_does_not_fit_is_a_one_line_error(hf_dir, tmp_path, capsys):
    assert (
        convert_main(["to-orbax", hf_dir, str(tmp_path / "x"), "--quiet", "--mesh", "expert=16"])
        == 1
    )
    err = capsys.readouterr().err
    assert "uses 16 devices, but 8 are present" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("spec", ["expert=4,data=2", "fsdp=2,tensor=2,expert=2"])
def test_an_hf_directory_loads_straight_into_the_mesh(hf_dir, spec):
    """generate.loading.load_params on a mesh: every leaf in the rules table's sharding (the
    stacked expert axis sharded too), values equal to the in-memory conversion."""
    from mixtral_jax.generate.loading import load_params

    mesh = sharding.make_mesh(sharding.MeshConfig.parse(spec))
    want = sharding.param_shardings(mj.param_shapes(CFG), mesh)
    _, params = load_params(hf_dir, {}, mesh=mesh)
    plain = importer.build_params(open_source(hf_dir), progress=False)
    got_flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), target, ref in zip(
        got_flat, jax.tree.leaves(want), jax.tree.leaves(plain), strict=True
    ):
        assert leaf.sharding.is_equivalent_to(target, leaf.ndim), path
        np.testing.assert_array_equal(np.asarray(leaf), ref)
