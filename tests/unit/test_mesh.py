"""The rank mesh is a pure function of the sizes (DESIGN.md: tp fastest, then pp, then dp)."""
import pytest

from shoal.parallel.mesh import build_mesh


def test_dp2_pp2_tp2_groups():
    mesh = build_mesh(dp_size=2, pp_size=2, tp_size=2)
    assert mesh.world_size == 8
    assert mesh.tp_groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert mesh.pp_groups == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert mesh.dp_groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    # expert parallel: the dp x tp ranks of one pipeline stage
    assert mesh.ep_groups == ((0, 1, 4, 5), (2, 3, 6, 7))
    assert mesh.output_ranks() == (2, 6)


@pytest.mark.parametrize("dp,pp,tp", [(1, 1, 1), (1, 1, 4), (1, 3, 2), (2, 1, 3), (3, 2, 2)])
def test_groups_partition_the_world(dp, pp, tp):
    mesh = build_mesh(dp, pp, tp)
    world = set(range(dp * pp * tp))
    for groups, size in ((mesh.tp_groups, tp), (mesh.pp_groups, pp), (mesh.dp_groups, dp),
                         (mesh.ep_groups, dp * tp)):
        flat = [r for g in groups for r in g]
        assert sorted(flat) == sorted(world)
        assert all(len(g) == size for g in groups)
    for rank in world:
        c = mesh.coord(rank)
        assert mesh.rank_of(c.dp_rank, c.pp_rank, c.tp_rank) == rank
        tp_group = mesh.group_containing(mesh.tp_groups, rank)
        assert tp_group == tuple(range(rank - c.tp_rank, rank - c.tp_rank + tp))  # adjacent


@pytest.mark.parametrize("bad", [0, -1, 1.5, None])
def test_bad_sizes_raise(bad):
    with pytest.raises(ValueError, match="must be a positive integer"):
        build_mesh(1, bad, 1)
