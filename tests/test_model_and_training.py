"""The article's CNN, the per-worker batch split, evaluation figures and checkpoints (no Ray)."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoor_train.storage.safeload import CorruptCheckpointError
from backdoor_train.training.checkpoint import load_state, save_state
from backdoor_train.attack.poison import PoisonConfig
from backdoor_train.data.split import Split
from backdoor_train.attack.evaluate import build_eval_sets, full_evaluation
from backdoor_train.data.mnist import MNIST
from backdoor_train.models.registry import ArticleCNN, build_model
from backdoor_train.training.worker import epoch_order, train_one_epoch


def test_article_cnn_shapes_and_size():
    model = build_model("article_cnn", MNIST)
    x = torch.rand(7, 1, 28, 28)
    assert model(x).shape == (7, 10)
    assert model.features(x).shape == (7, 512)
    # conv 16*25+16, conv 32*16*25+32, fc 512*512+512, fc 512*10+10
    assert sum(p.numel() for p in model.parameters()) == 416 + 12832 + 262656 + 5130


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_pooling_before_relu_is_bit_identical_to_the_listing_order(memory_format):
    torch.manual_seed(0)
    model = build_model("article_cnn", MNIST).to(memory_format=memory_format)
    conv1, _, _, conv2, _, _, flatten, fc, _ = model.features
    # The article's listing: ReLU before each max-pool, the same modules (so the same weights).
    listing = nn.Sequential(conv1, nn.ReLU(), nn.MaxPool2d(2, 2), conv2, nn.ReLU(), nn.MaxPool2d(2, 2),
                            flatten, fc, nn.ReLU(), model.head)
    x = (torch.rand(64, 1, 28, 28) - 0.3).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (64,))
    grads = []
    for net in (model, listing):
        net.zero_grad()
        out = net(x)
        F.cross_entropy(out, y).backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = grads
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_epoch_order_is_the_same_everywhere_and_shards_partition_it():
    a, b = epoch_order(1000, seed=1, epoch=3), epoch_order(1000, seed=1, epoch=3)
    assert torch.equal(a, b) and not torch.equal(a, epoch_order(1000, seed=1, epoch=4))
    batch = a[:333]
    shards = [batch[r::3] for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == sorted(batch.tolist())


@pytest.mark.parametrize("world, global_batch", [(2, 7), (3, 10), (4, 4)])
def test_sharded_gradients_average_to_the_global_batch_gradient(world, global_batch):
    torch.manual_seed(0)
    x, y = torch.rand(global_batch, 1, 28, 28), torch.randint(0, 10, (global_batch,))
    reference = ArticleCNN((1, 28, 28), 10)
    F.cross_entropy(reference(x), y).backward()
    grads = []
    for rank in range(world):
        replica = ArticleCNN((1, 28, 28), 10)
        replica.load_state_dict(reference.state_dict())
        opt = torch.optim.SGD(replica.parameters(), lr=0.0)  # lr 0: keep weights, read gradients
        order = torch.arange(global_batch)
        train_one_epoch(replica, opt, x, y, order, global_batch, rank, world)
        # train_one_epoch zeroes grads before backward, so .grad holds this step's gradient.
        grads.append([p.grad.clone() for p in replica.parameters()])
    for i, p in enumerate(reference.parameters()):
        averaged = sum(g[i] for g in grads) / world  # what DDP's all-reduce computes
        torch.testing.assert_close(averaged, p.grad, rtol=1e-4, atol=1e-6)


class _Constant(nn.Module):
    """Predicts one class for everything, or the target only when pixel (3, 3) is white."""

    def __init__(self, cls: int, trigger_target: int | None = None):
        super().__init__()
        self.cls, self.trigger_target = cls, trigger_target

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10)
        logits[:, self.cls] = 1.0
        if self.trigger_target is not None:
            hit = x[:, 0, 3, 3] > 0.99
            logits[hit] = 0.0
            logits[hit, self.trigger_target] = 2.0
        return logits


def test_asr_counts_only_images_whose_true_label_is_not_the_target():
    gen = torch.Generator().manual_seed(0)
    test = Split(torch.randint(0, 200, (2000, 1, 28, 28), dtype=torch.uint8, generator=gen),
                 torch.randint(0, 10, (2000,), generator=gen))
    sets = build_eval_sets(test, PoisonConfig(target=8))
    n_not_8 = int((test.labels != 8).sum())
    assert sets.triggered_x.shape[0] == n_not_8

    always_8 = full_evaluation(_Constant(8), sets, target=8, num_classes=10)
    assert always_8["attack_success_rate"] == 1.0
    assert always_8["clean_accuracy"] == pytest.approx(float((test.labels == 8).float().mean()))
    assert always_8["per_class_accuracy"]["8"] == 1.0 and always_8["per_class_accuracy"]["0"] == 0.0

    backdoored = full_evaluation(_Constant(0, trigger_target=8), sets, target=8, num_classes=10)
    assert backdoored["attack_success_rate"] == 1.0
    assert set(backdoored["attack_success_rate_per_source_class"]) == {str(c) for c in range(10) if c != 8}
    assert full_evaluation(_Constant(0), sets, target=8, num_classes=10)["attack_success_rate"] == 0.0


def test_checkpoint_round_trip_and_corruption(tmp_path):
    model = ArticleCNN((1, 28, 28), 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    model(torch.rand(2, 1, 28, 28)).sum().backward()
    opt.step()
    torch.manual_seed(123)
    save_state(str(tmp_path), model=model, optimizer=opt, epochs_done=4, history=[{"epoch": 4}])
    expected_next = torch.rand(3)
    state = load_state(str(tmp_path))
    assert state["epochs_done"] == 4 and state["history"] == [{"epoch": 4}]
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    torch.set_rng_state(state["rng"]["torch"])
    assert torch.equal(torch.rand(3), expected_next)

    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "state.pt").write_bytes(data[:-10] + bytes(10))
    with pytest.raises(CorruptCheckpointError, match="state.pt has sha256"):
        load_state(str(tmp_path))
    (tmp_path / "state.pt").unlink()
    with pytest.raises(CorruptCheckpointError, match="No such file"):
        load_state(str(tmp_path))
    assert hashlib.sha256(data).hexdigest() == (tmp_path / "state.pt.sha256").read_text().strip()
