"""Run by test_train.py in two spawned processes: a gloo DDP pretraining run."""

import os

import torch
import torch.distributed as dist


def _env(rank: int, world: int, port: int) -> None:
    """This process as rank ``rank`` of ``world`` (torchrun's variables), on one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def run(rank: int, world: int, port: int, data: str, out: str, dump: str) -> None:
    _env(rank, world, port)
    from filterkit.moco import contrastive_loss, gather_keys
    from filterkit.train import TrainOptions, pretrain

    options = TrainOptions(preset="vit-mini-8-32", depth=1, batch_size=8, max_steps=3, epochs=10,
                           proj_hidden=32, pred_hidden=32, out_dim=16, checkpoint_every=100)
    result = pretrain(data, out, options, device="cpu", workers=0, progress=False)
    # The logits of each rank cover the global batch: keys from both ranks, labels offset.
    torch.manual_seed(123)
    q_all, k_all = torch.randn(2 * 4, 16), torch.randn(2 * 4, 16)
    q, k = q_all[rank * 4:(rank + 1) * 4], k_all[rank * 4:(rank + 1) * 4]
    gathered, offset = gather_keys(k)
    loss = contrastive_loss(q, k, 0.2)
    dist.all_reduce(loss)
    torch.save({"state": result.model.state_dict(), "gathered_rows": gathered.shape[0], "offset": offset,
                "mean_loss": loss / world, "q_all": q_all, "k_all": k_all}, f"{dump}/rank{rank}.pt")
    dist.destroy_process_group()


def run_case(rank: int, world: int, port: int, data: str, out: str, dump: str, case: str) -> None:
    """A gloo DDP run in which something goes wrong; writes this rank's outcome ("ok" or
    "<exception type>: <message>") to dump/rank<rank>.txt. Cases:

    nan-on-rank1       rank 1's loss is NaN at the first step
    collapse-on-rank1  rank 1's features are one point (std 0) at every step
    few-images         a batch of 6 (the test gives fewer images than processes)
    slow-monitor       rank 0's epoch-end kNN monitor takes 10 s; the process group times out
                       after 4 s, so the other rank must not wait for it in a collective
    budget             --minutes 0.03 with a plan far too long, and rank 1's clock never runs out:
                       rank 0's clock must stop both ranks (outcome "ok <steps> <stopped_by>");
                       no re-plan from the run's pace
    replan             the same with the re-plans: rank 0's clock must re-plan both ranks alike
    """
    from datetime import timedelta

    _env(rank, world, port)
    import filterkit.moco as moco
    import filterkit.train as train

    options = train.TrainOptions(preset="vit-mini-8-32", depth=1, batch_size=8, max_steps=4, epochs=10,
                                 proj_hidden=32, pred_hidden=32, out_dim=16, checkpoint_every=100)
    kwargs = {}
    if case == "nan-on-rank1" and rank == 1:
        real_loss = moco.contrastive_loss
        moco.contrastive_loss = lambda q, k, t, queue=None: real_loss(q, k, t, queue) * float("nan")
    elif case == "collapse-on-rank1":
        options.warmup_epochs, kwargs["collapse_patience"] = 0, 2
        if rank == 1:
            real_forward = moco.MoCo.forward

            def collapsed(self, x1, x2):
                loss, features = real_forward(self, x1, x2)
                return loss, torch.ones_like(features)

            moco.MoCo.forward = collapsed
    elif case == "few-images":
        options.batch_size = 6  # divides by 3 processes
    elif case == "slow-monitor":
        kwargs.update(knn_train=data, knn_test=data)  # the folder's sub-folders as classes
        # Rendezvous on a store with a generous timeout, so that only the collectives get 4 s.
        store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=120))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=4))
        if rank == 0:
            import time

            from filterkit.train import monitor

            monitor._knn_monitor = lambda *args: (time.sleep(10), 0.5)[1]
    elif case in ("budget", "replan"):
        import filterkit.train.loop as loop

        options.max_steps, options.epochs, options.minutes = None, None, 0.03 if case == "budget" else 0.1
        loop.planned_steps = lambda *args: 100_000
        if case == "budget":
            loop.REPLAN_AT = ()
        if rank == 1:
            train.Monitor.wall_seconds = lambda self: 0.0
    try:
        result = train.pretrain(data, out, options, device="cpu", workers=0, progress=False, **kwargs)
        outcome = f"ok {result.steps} {result.total_steps} {result.stopped_by}" if case in ("budget", "replan") else "ok"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    with open(f"{dump}/rank{rank}.txt", "w") as f:
        f.write(outcome)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_simclr(rank: int, world: int, port: int, data: str, out: str, dump: str) -> None:
    """SimCLR under gloo DDP: NT-Xent on fixed tensors split across the ranks (loss and
    gradients), then a short pretraining run; writes dump/simclr<rank>.pt."""
    _env(rank, world, port)
    from filterkit.methods.simclr import nt_xent
    from filterkit.train import TrainOptions, pretrain

    dist.init_process_group("gloo")
    torch.manual_seed(7)
    z1_all, z2_all = torch.randn(world * 3, 8), torch.randn(world * 3, 8)
    z1 = z1_all[rank * 3:(rank + 1) * 3].clone().requires_grad_(True)
    z2 = z2_all[rank * 3:(rank + 1) * 3].clone().requires_grad_(True)
    loss = nt_xent(z1, z2, 0.2)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    options = TrainOptions(preset="vit-mini-8-32", depth=1, batch_size=8, max_steps=2, epochs=10, method="simclr",
                           proj_hidden=32, out_dim=16, checkpoint_every=100)
    result = pretrain(data, out, options, device="cpu", workers=0, progress=False)
    torch.save({"z1_all": z1_all, "z2_all": z2_all, "mean_loss": mean_loss / world, "grad1": z1.grad,
                "grad2": z2.grad, "state": result.model.state_dict(), "loss": result.final_loss},
               f"{dump}/simclr{rank}.pt")
    dist.destroy_process_group()


def run_global_batch(rank: int, world: int, port: int, data: str, out: str, dump: str) -> None:
    """Barlow Twins and SupCon under gloo DDP: each loss on fixed tensors split across the ranks
    (loss and gradients; SupCon with its labels), SwAV's Sinkhorn codes of split scores, then a
    short SupCon pretraining run whose labels come from the folder; writes dump/global<rank>.pt."""
    _env(rank, world, port)
    from filterkit.methods.barlow_twins import barlow_loss
    from filterkit.methods.supcon import supcon_loss
    from filterkit.methods.swav import sinkhorn
    from filterkit.train import TrainOptions, pretrain

    dist.init_process_group("gloo")
    torch.manual_seed(11)
    n = 3
    z1_all, z2_all = torch.randn(world * n, 6), torch.randn(world * n, 6)
    labels_all = torch.tensor([0, 1, 0, 2, 1, 1])[: world * n]
    mine = slice(rank * n, (rank + 1) * n)
    found = {"z1_all": z1_all, "z2_all": z2_all, "labels_all": labels_all}
    for name, loss_of in (("barlow", lambda a, b: barlow_loss(a, b)),
                          ("supcon", lambda a, b: supcon_loss(a, b, labels_all[mine], 0.2))):
        z1 = z1_all[mine].clone().requires_grad_(True)
        z2 = z2_all[mine].clone().requires_grad_(True)
        loss = loss_of(z1, z2)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        found.update({f"{name}_loss": mean_loss / world, f"{name}_grad1": z1.grad, f"{name}_grad2": z2.grad})
    scores_all = torch.rand(world * n, 5) * 2 - 1
    found.update(scores_all=scores_all, codes=sinkhorn(scores_all[mine]))
    options = TrainOptions(preset="vit-mini-8-32", depth=1, batch_size=8, max_steps=2, epochs=10, method="supcon",
                           proj_hidden=32, out_dim=16, checkpoint_every=100)
    result = pretrain(data, out, options, device="cpu", workers=0, progress=False)
    found.update(state=result.model.state_dict(), loss=result.final_loss)
    torch.save(found, f"{dump}/global{rank}.pt")
    dist.destroy_process_group()


def run_moco_queue(rank: int, world: int, port: int, data: str, out: str, dump: str) -> None:
    """MoCo v3 with --queue under gloo DDP: ctr with a queue on fixed tensors split across the
    ranks, then a short pretraining run; writes dump/queue<rank>.pt."""
    _env(rank, world, port)
    from filterkit.moco import contrastive_loss
    from filterkit.train import TrainOptions, pretrain

    dist.init_process_group("gloo")
    torch.manual_seed(5)
    q_all, k_all = torch.randn(world * 3, 8), torch.randn(world * 3, 8)
    queue = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)  # the same on every rank
    loss = contrastive_loss(q_all[rank * 3:(rank + 1) * 3], k_all[rank * 3:(rank + 1) * 3], 0.2, queue)
    dist.all_reduce(loss)
    # 2 steps of batch 8: 16 keys pushed per step into 20 rows (the last pushed after DDP's
    # last buffer broadcast, so only pushing the gathered batch keeps the ranks' queues equal).
    options = TrainOptions(preset="vit-mini-8-32", depth=1, batch_size=8, max_steps=2, epochs=10, queue=20,
                           proj_hidden=32, pred_hidden=32, out_dim=16, checkpoint_every=100)
    result = pretrain(data, out, options, device="cpu", workers=0, progress=False)
    torch.save({"q_all": q_all, "k_all": k_all, "queue": queue, "mean_loss": loss / world,
                "state": result.model.state_dict(), "loss": result.final_loss}, f"{dump}/queue{rank}.pt")
    dist.destroy_process_group()


def run_banks(rank: int, world: int, port: int, data: str, out: str, dump: str) -> None:
    """NNCLR's support queue and Mean Shift's memory bank under gloo DDP: each loss on fixed
    tensors split across the ranks with one support set / bank (loss and gradients), each pushed
    as the method pushes it; then short nnclr and meanshift runs; writes dump/banks<rank>.pt."""
    _env(rank, world, port)
    import torch.nn.functional as F

    from filterkit.methods.base import EmbeddingQueue, gather_no_grad
    from filterkit.methods.meanshift import mean_shift_loss
    from filterkit.methods.nnclr import nearest_neighbour, nnclr_infonce
    from filterkit.train import TrainOptions, pretrain

    dist.init_process_group("gloo")
    torch.manual_seed(13)
    n = 3
    mine = slice(rank * n, (rank + 1) * n)
    z_all, p_all = F.normalize(torch.randn(world * n, 6), dim=1), torch.randn(world * n, 6)
    support = F.normalize(torch.randn(4, 6), dim=1)  # the same on every rank, as pushes keep it
    p = p_all[mine].clone().requires_grad_(True)
    nn_loss = nnclr_infonce(nearest_neighbour(z_all[mine], support), p, 0.2)
    nn_loss.backward()
    nn_mean = nn_loss.detach().clone()
    dist.all_reduce(nn_mean)
    queue = EmbeddingQueue(5, 6)
    queue.push(gather_no_grad(z_all[mine]))  # NNCLR's push: z̄1 of the global batch
    t_all, q_all = F.normalize(torch.randn(world * n, 6), dim=1), torch.randn(world * n, 6)
    bank = EmbeddingQueue(16, 6)
    bank.push(gather_no_grad(t_all[mine]))  # MSF's push comes first: each target finds itself
    q = q_all[mine].clone().requires_grad_(True)
    ms_loss = mean_shift_loss(q, t_all[mine], bank.contents(), k=2)
    ms_loss.backward()
    ms_mean = ms_loss.detach().clone()
    dist.all_reduce(ms_mean)
    found = {"z_all": z_all, "p_all": p_all, "support": support, "nn_loss": nn_mean / world, "nn_grad": p.grad,
             "queue": queue.state_dict(), "t_all": t_all, "q_all": q_all, "ms_loss": ms_mean / world,
             "ms_grad": q.grad, "bank": bank.state_dict()}
    for method in ("nnclr", "meanshift"):
        options = TrainOptions(preset="vit-mini-8-32", depth=1, batch_size=8, max_steps=2, epochs=10, method=method,
                               proj_hidden=32, pred_hidden=32, out_dim=16, checkpoint_every=100)
        result = pretrain(data, f"{out}/{method}", options, device="cpu", workers=0, progress=False)
        found[method] = {"state": result.model.state_dict(), "loss": result.final_loss}
    torch.save(found, f"{dump}/banks{rank}.pt")
    dist.destroy_process_group()


def run_multicrop(rank: int, world: int, port: int, data: str, out: str, dump: str) -> None:
    """Multi-crop under gloo DDP: moco-v3's ctr with keys gathered once and shared by several
    queries, on fixed tensors split across the ranks; then short moco-v3 (with a queue) and swav
    runs with two local views each; writes dump/multicrop<rank>.pt."""
    _env(rank, world, port)
    from filterkit.moco import contrastive_loss, normalised_keys
    from filterkit.train import TrainOptions, pretrain

    dist.init_process_group("gloo")
    torch.manual_seed(9)
    queries_all, k_all = [torch.randn(world * 3, 8) for _ in range(3)], torch.randn(world * 3, 8)
    mine = slice(rank * 3, (rank + 1) * 3)
    shared = normalised_keys(k_all[mine])  # gathered once, then used by every query
    loss = sum(contrastive_loss(q[mine], k_all[mine], 0.2, gathered=shared) for q in queries_all)
    dist.all_reduce(loss)
    saved = {"queries_all": queries_all, "k_all": k_all, "mean_loss": loss / world}
    for method, extra in (("moco-v3", {"queue": 8}), ("swav", {})):
        options = TrainOptions(preset="vit-mini-8-32", depth=1, batch_size=8, max_steps=2, epochs=10, method=method,
                               local_crops=2, min_crop_scale=0.2, proj_hidden=32, pred_hidden=32, out_dim=16,
                               checkpoint_every=100, **extra)
        result = pretrain(data, f"{out}/{method}", options, device="cpu", workers=0, progress=False)
        saved[method] = {"state": result.model.state_dict(), "loss": result.final_loss}
    torch.save(saved, f"{dump}/multicrop{rank}.pt")
    dist.destroy_process_group()


def run_cli(rank: int, world: int, port: int, data: str, out: str, dump: str) -> None:
    """`filterkit pretrain` as torchrun would start it on each rank; writes what each rank
    printed to dump/cli<rank>.txt."""
    import contextlib
    import io

    _env(rank, world, port)
    from filterkit.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main(["pretrain", data, "--out", out, "--preset", "vit-mini-8-32", "--depth", "1", "--batch-size", "8",
                     "--max-steps", "2", "--workers", "0", "--device", "cpu", "-q"])
    with open(f"{dump}/cli{rank}.txt", "w", encoding="utf-8") as f:
        f.write(f"exit {code}\n{printed.getvalue()}")
    if dist.is_initialized():
        dist.destroy_process_group()
