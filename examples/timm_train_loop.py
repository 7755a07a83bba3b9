"""A timm model with DropBlock in an ordinary training loop: the whole integration in a screen.

    python examples/timm_train_loop.py --model resnet18 --recipe paper-resnet50 --steps 20

Uses torchvision's FakeData (random images), so it runs anywhere without a download; swap in
your own DataLoader. The schedule advances on every optimizer.step() (no change to the loop).
"""

import argparse

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

import dropblock_fx as dbx
import dropblock_fx.timm

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="resnet18")
p.add_argument("--recipe", default="paper-resnet50")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--image-size", type=int, default=96)
args = p.parse_args()

data = torchvision.datasets.FakeData(size=args.steps * 8, image_size=(3, args.image_size, args.image_size),
                                     num_classes=10, transform=transforms.ToTensor())
loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)

# every timm.create_model argument works here (pretrained=True, checkpoint_path=..., ...)
model = dropblock_fx.timm.create_model(args.model, recipe=args.recipe, num_classes=10,
                                       recipe_overrides={"input_size": [3, args.image_size, args.image_size]})
print(dbx.describe(model))

opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
sched = dbx.attach_schedule(model, total_steps=len(loader), optimizer=opt)
model.train()
for step, (x, y) in enumerate(loader):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()  # also advances the DropBlock schedule
    if step % 5 == 0 or step == len(loader) - 1:
        print(f"step {step:3d}  loss {loss.item():.3f}  drop rate {sched.drop_prob:.4f}")

state = {"model": model.state_dict(), "dropblock_schedule": sched.state_dict()}  # resume exactly
model.eval()  # DropBlock is the identity at inference
