"""Quick start: add the paper's DropBlock to a timm ResNet-50 and train a few steps.

Runs on the CPU on random data, nothing downloaded (8 s on an idle 2-core x86_64 machine,
torch 2.14.1, timm 1.0.31, 2026-12-02):

    python examples/quickstart.py
"""

import timm
import torch

import dropblock_fx as dbx

torch.manual_seed(0)
model = timm.create_model("resnet50", pretrained=False, num_classes=10)
model = dbx.apply_dropblock(model, "paper-resnet50")  # in place; weights untouched
print(dbx.describe(model))

steps = 6
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
sched = dbx.attach_schedule(model, total_steps=steps, optimizer=opt)  # opt.step() advances it

# Train at the size the plan was made for (the recipe's input_size, 3x224x224), or its block
# sizes and expected rates do not describe what runs: for other images, pass
# apply_dropblock(..., input_size=(3, H, W)).
x, y = torch.randn(2, 3, 224, 224), torch.randint(0, 10, (2,))
model.train()
for step in range(steps):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    rates = sorted({round(m.drop_prob, 4) for m in model.modules() if isinstance(m, dbx.DropBlockNd)})
    print(f"step {step + 1}/{steps}  loss {loss.item():.3f}  drop rates now {rates}")

model.eval()
with torch.no_grad():
    a = model(x)
dbx.remove_dropblock(model)
with torch.no_grad():
    b = model(x)
print("eval output unchanged by DropBlock:", torch.equal(a, b))
