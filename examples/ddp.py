"""EPIC in a DistributedDataParallel job; launch with torchrun (README, "Several processes").

    torchrun --nproc_per_node=2 examples/ddp.py            # gloo on CPUs, NCCL on GPUs

Every rank holds the whole (un-augmented) dataset and trains on its share of the kept
examples; a round embeds each rank's share, rank 0 chooses, and every rank gets its choice.
"""

import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import epic

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
digits = load_digits()
dataset = TensorDataset(torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16,
                        torch.tensor(digits.target))
torch.manual_seed(0)  # the same initial weights on every rank
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                          torch.nn.Linear(128, 10)).to(device)
model = DistributedDataParallel(net)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

defense = epic.EPIC(fraction=0.1, warmup=5, every=2, num_examples=len(dataset))
sampler = epic.DistributedKeepSampler(defense)       # in place of DistributedSampler
loader = DataLoader(dataset, batch_size=64, sampler=sampler)
for epoch in range(int(os.environ.get("EPOCHS", "15"))):
    if defense.due(epoch):
        defense.update(model, dataset, epoch)        # all ranks together
    sampler.set_epoch(epoch)
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        optimizer.step()
if dist.get_rank() == 0:
    print(f"dropped {len(defense.dropped)} of {len(dataset)}: {defense.dropped.tolist()}")
dist.destroy_process_group()
