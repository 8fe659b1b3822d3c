import pytest
import torch
import torch.distributed as dist

from arbd.parallel.launch_utils import run_on_ranks
from arbd.parallel.mesh import Layout, Mesh


@pytest.mark.parametrize("layout", [Layout(4, 1, 2), Layout(2, 2, 2), Layout(2, 2, 1, cb=2),
                                    Layout(3, 1, 3), Layout(4, 2, 4)])
def test_group_families_partition_the_world(layout):
    world = layout.world
    layout.validate(world)
    for family, size in [(layout.tp_groups(), layout.tp), (layout.dp_groups(), layout.dp),
                         (layout.ep_groups(), layout.ep),
                         (layout.expert_dp_groups(), layout.dp // layout.ep),
                         (layout.cb_groups(), layout.cb or world)]:
        ranks = sorted(r for g in family for r in g)
        assert ranks == list(range(world))
        assert all(len(g) == size for g in family)
    # a tp group shares its dp index; a dp group shares its tp index
    for g in layout.tp_groups():
        assert len({layout.coords(r)[0] for r in g}) == 1
    for g in layout.dp_groups():
        assert len({layout.coords(r)[1] for r in g}) == 1
    # an ep group and an expert-dp group meet in exactly one rank
    for e in layout.ep_groups():
        for x in layout.expert_dp_groups():
            if layout.coords(e[0])[1] == layout.coords(x[0])[1]:
                assert len(set(e) & set(x)) == 1


@pytest.mark.parametrize("layout, world, message", [
    (Layout(3, 1), 4, "does not match the world size 4"),
    (Layout(4, 1, 3), 4, "ep = 3 must divide dp = 4"),
    (Layout(4, 1, 1, cb=3), 4, "cb = 3 must divide the world size 4"),
    (Layout(0, 1), 0, "dp must be a positive int"),
])
def test_bad_layouts_name_the_field(layout, world, message):
    with pytest.raises(ValueError, match=message):
        layout.validate(world)


def _sum_in_groups(rank, world, dp, tp, ep):
    mesh = Mesh(Layout(dp, tp, ep))
    out = {}
    for name in ("tp_group", "dp_group", "ep_group", "expert_dp_group", "cb_group"):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=getattr(mesh, name))
        out[name] = t.item()
    out["mpu"] = (mesh.get_model_parallel_rank(), mesh.get_data_parallel_rank(),
                  mesh.get_data_parallel_world_size())
    return out


def test_mesh_groups_on_four_gloo_ranks():
    layout = Layout(2, 2, 2)
    results = run_on_ranks(_sum_in_groups, 4, 2, 2, 2)
    for rank, res in enumerate(results):
        for name, family in [("tp_group", layout.tp_groups()), ("dp_group", layout.dp_groups()),
                             ("ep_group", layout.ep_groups()),
                             ("expert_dp_group", layout.expert_dp_groups()),
                             ("cb_group", layout.cb_groups())]:
            mine = next(g for g in family if rank in g)
            assert res[name] == sum(mine), (rank, name)
        dp_i, tp_i = layout.coords(rank)
        assert res["mpu"] == (tp_i, dp_i, 2)
