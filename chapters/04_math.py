# %% [markdown]
# # Chapter 4: The mathematical model, derived and checked
#
# **Seed section:** 4 (数学模型和公式 & 详细讲解 & 举例说明: 4.1 数学模型构建, 4.2 公式推导过程,
# 4.3 案例分析与讲解), the article's model, its formulas and its worked case of image-text matching.
#
# **Goals:** write a two-modality model as a function $y = f(x_1, x_2; \theta)$ and training as empirical risk
# minimisation; derive, step by step, every gradient that training a cross-attention model needs (cross-entropy,
# mean squared error, softmax, attention, the contrastive loss) and see why attention divides by $\sqrt{d_k}$;
# end every derivation with a symbolic `assert` (sympy) and a numeric one against PyTorch's autograd; build
# cross-attention in NumPy with a hand-written backward pass; then train the seed article's image-text
# matching model and look at what it learned, next to an ablation without cross-attention.
#
# **Prerequisites:** chapter 1 (the shapes world), chapters 2-3 (attention, encoders, fusion); matrix calculus at
# the level of "the gradient of $\mathbf{w}^\top\mathbf{x}$ is $\mathbf{x}$"; a little probability
# (expectation, variance, independence).
#
# **Run time:** about 3 min on 2 idle CPU cores (155 s measured; most of it training four matching models in 4.3).

# %%
import dataclasses
import inspect
import math
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import sympy as sp
import torch
import torch.nn.functional as F
from IPython.display import Math, display

import mmlite.plot
import mmlite.utils
from mmlite import symbolic
from mmlite.attention import CoAttention, CrossAttention, scaled_dot_product_attention
from mmlite.data import (COLOR_RGB, COLORS, FIELDS, HELD_OUT_PAIRS, MAX_OBJECTS, NEGATIVE_KINDS, PRESETS, SHAPES,
                         build_tokenizer, load)
from mmlite.data.grammar import Draw, caption_specs, negative_specs, render
from mmlite.data.semantics import scene_list
from mmlite.evaluate import evaluate_matching, score_pairs
from mmlite.models import MatchingConfig, MatchingModel
from mmlite.numpy_attention import cross_attention_backward, cross_attention_forward, finite_difference, softmax
from mmlite.objectives import contrastive_loss, cross_entropy
from mmlite.utils import run_seed

device = mmlite.utils.setup(seed=0, threads=2)
world = load("tiny", seed=0)
tokenizer = build_tokenizer()
print(device, {name: len(split) for name, split in world.items()}, len(tokenizer), "tokens")


def show(lhs: str, expr) -> None:
    """Render `lhs = expr` as LaTeX (the stored text/latex output is what nbval compares)."""
    display(Math(lhs + " = " + (expr if isinstance(expr, str) else sp.latex(expr))))


# %% [markdown]
# ## 4.1 Building the model
#
# The seed article writes a multimodal model as one function of all its inputs,
#
# $$y = f(x_1, x_2, \dots, x_n;\ \theta),$$
#
# where $x_1, \dots, x_n$ are the modalities (here two: an image $x_1 \in [0,1]^{3\times 32\times 32}$ and a
# caption $x_2$, a sequence of token ids), $\theta$ collects every parameter, and $y$ is the prediction.
# Training is the choice of parameters that makes the predictions agree with the targets $y^*$,
#
# $$\theta^* = \arg\min_\theta\ L\big(f(x_1, \dots, x_n;\ \theta),\ y^*\big),$$
#
# and since we only ever see a finite training set $\{(x^{(i)}, y^{*(i)})\}_{i=1}^N$, the $L$ we can minimise
# is the **empirical risk**, the mean loss over it: $\hat R(\theta) = \frac1N \sum_i \ell(f(x^{(i)};\theta),
# y^{*(i)})$. Gradient descent does the minimising, $\theta \leftarrow \theta - \eta\,\nabla_\theta \hat R$,
# so the whole of this chapter is about one object: the gradient.
#
# Made concrete for the model this chapter ends with (4.3), $f$ is a composition
#
# $$f(x_1, x_2;\theta) = \mathrm{softmax}\Big(g_{\theta_c}\big(\,\mathrm{fuse}_{\theta_f}(\,
# \mathrm{CNN}_{\theta_i}(x_1),\ \mathrm{GRU}_{\theta_t}(x_2)\,)\big)\Big),\qquad
# \theta = (\theta_i, \theta_t, \theta_f, \theta_c),$$
#
# and $\theta$ is just the list of the model's tensors. Here they are, grouped the way the formula groups them:

# %%
cfg = MatchingConfig(vocab_size=len(tokenizer), image_encoder="cnn", text_encoder="gru", fusion="cross_attention")
model = MatchingModel(cfg)
total = mmlite.utils.count_parameters(model)
print(f"{'parameter group':34s} {'tensors':>7s} {'scalars':>8s}")
for name, child in model.named_children():
    n = mmlite.utils.count_parameters(child)
    print(f"{name:34s} {len(list(child.parameters())):7d} {n:8,d}")
    if name == "fusion":  # one level deeper: the cross-attention fusion's own parts
        for sub, part in child.named_modules():
            if sub.count(".") == (2 if sub.startswith("layers") else 0) and sub and sub != "layers.0":
                print(f"  {sub:32s} {len(list(part.parameters())):7d} {mmlite.utils.count_parameters(part):8,d}")
print(f"{'total':34s} {len(list(model.parameters())):7d} {total:8,d}")
assert sum(mmlite.utils.count_parameters(c) for c in model.children()) == total

# %% [markdown]
# About 290 thousand numbers, half of them in the CNN. Every one of them moves by the gradient of the same
# scalar: the loss.
#
# ### The two losses the seed names, and their gradients
#
# **Cross-entropy** scores a predicted distribution $p = \mathrm{softmax}(z)$ over $C$ classes against the true
# class $y$: $\mathrm{CE}(z, y) = -\log p_y = -z_y + \log\sum_j e^{z_j}$. Differentiating the second form,
# $\partial/\partial z_k$ gives $-[k=y] + e^{z_k}/\sum_j e^{z_j}$, that is
#
# $$\frac{\partial\, \mathrm{CE}}{\partial z} = \mathrm{softmax}(z) - \mathrm{onehot}(y).$$
#
# The gradient is "what the model believes minus what is true": it vanishes only when $p$ is the one-hot target,
# and it is bounded (each entry in $[-1, 1]$) however wrong the logits are. sympy derives it for every class $y$
# of a 3-class problem and checks the claim; then autograd, through `mmlite.objectives.cross_entropy` with a mean
# over a batch of $B$, must give the same numbers divided by $B$.

# %%
z = symbolic.vector("z", 3)
p = symbolic.softmax(z)
for y in range(3):
    loss = -sp.log(p[y])
    grad = symbolic.gradient(loss, z)
    onehot = sp.Matrix([int(k == y) for k in range(3)])
    assert symbolic.equal(grad, p - onehot), y  # symbolic: dCE/dz = softmax(z) - onehot(y)
show(r"\mathrm{CE}(z, 1)", sp.expand_log(-sp.log(p[0]), force=True).simplify())
show(r"\frac{\partial\,\mathrm{CE}(z, 1)}{\partial z_1}", symbolic.gradient(-sp.log(p[0]), z)[0].simplify())

gen = torch.Generator().manual_seed(0)
logits = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
targets = torch.randint(0, 3, (6,), generator=gen)
cross_entropy(logits, targets).backward()  # mean over the batch of 6
derived = torch.stack([torch.from_numpy(symbolic.evaluate(symbolic.gradient(-sp.log(p[int(t)]), z),
                                                          {z: row.detach().numpy()}).ravel())
                       for row, t in zip(logits, targets)]) / 6  # the sympy gradient, evaluated, / B
# float64 both ways: sympy's evalf and autograd agree to ~1e-16, so 1e-12 is a generous bound
torch.testing.assert_close(logits.grad, derived, rtol=1e-12, atol=1e-14)
torch.testing.assert_close(logits.grad, (torch.softmax(logits, -1) - F.one_hot(targets, 3)) / 6,
                           rtol=1e-12, atol=1e-14)
print("dCE/dz = softmax(z) - onehot(y): symbolic and autograd agree")

# %% [markdown]
# **Mean squared error** scores a real-valued prediction $\hat y \in \mathbb{R}^n$ (a count, a box, a pixel):
# $\mathrm{MSE}(\hat y, y) = \frac1n\sum_i (\hat y_i - y_i)^2$, so
#
# $$\frac{\partial\,\mathrm{MSE}}{\partial \hat y} = \frac{2}{n}(\hat y - y).$$
#
# Unlike cross-entropy's, this gradient grows with the error: one far-off prediction dominates a batch, which is
# why MSE is sensitive to outliers (and why squashing a probability through a sigmoid and then using MSE trains
# badly: the sigmoid's flat tails multiply that gradient by almost zero).

# %%
y_hat, y_true = symbolic.vector(r"\hat{y}", 4), symbolic.vector("y", 4)
mse = sum((y_hat - y_true).applyfunc(lambda e: e**2)) / 4
grad_mse = symbolic.gradient(mse, y_hat)
assert symbolic.equal(grad_mse, 2 * (y_hat - y_true) / 4)  # symbolic
show(r"\frac{\partial\,\mathrm{MSE}}{\partial \hat y}", grad_mse.T)

pred = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
truth = torch.randn(4, generator=gen, dtype=torch.float64)
F.mse_loss(pred, truth).backward()
derived = symbolic.evaluate(grad_mse, {y_hat: pred.detach().numpy(), y_true: truth.numpy()}).ravel()
torch.testing.assert_close(pred.grad, torch.from_numpy(derived), rtol=1e-12, atol=1e-14)
print("dMSE/dy_hat = 2 (y_hat - y) / n: symbolic and autograd agree")

# %% [markdown]
# ### Empirical risk minimisation on a problem from the shapes world
#
# Before the big model, the whole recipe on a model small enough to write its gradient by hand. The question is
# two-modal: an image $x_1$ and a colour word $x_2$ ("is there a **red** shape?"), half of the questions true.
# The model is bilinear: a feature map $\varphi(x_1) \in \mathbb{R}^F$ of the image, and one $2 \times F$ weight
# matrix per colour word, picked by the word,
#
# $$z = W_{x_2}\,\varphi(x_1) + b_{x_2} \in \mathbb{R}^2,\qquad \theta = \{W_c, b_c\}_{c=1}^{6},\qquad
# \hat R(\theta) = \frac1N\sum_i \mathrm{CE}(z^{(i)}, y^{(i)}).$$
#
# With the cross-entropy gradient just derived and the chain rule through the linear map,
# $\partial \hat R/\partial W_c = \frac1N \sum_{i:\,x_2^{(i)}=c} (p^{(i)} - \mathrm{onehot}(y^{(i)}))\,
# \varphi(x_1^{(i)})^\top$: gradient descent with no autograd at all. Two feature maps $\varphi$ are compared:
# the raw pixels averaged over $4\times4$ blocks ($8\cdot8\cdot3 = 192$ numbers, where a shape's colour lands in
# a different feature depending on where the shape is), and a colour histogram ($4^3 = 64$ bins of the RGB cube,
# the fraction of pixels in each, which does not care where anything is).

# %%
def color_questions(split, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One "is there a <color> shape?" question per image, true for half of them: (color index, label)."""
    col, valid = FIELDS.index("color"), FIELDS.index("valid")
    present = np.zeros((len(split), len(COLORS)), dtype=bool)  # (N, colors)
    for slot in range(MAX_OBJECTS):
        real = split.objects[:, slot, valid] == 1
        present[np.flatnonzero(real), split.objects[real, slot, col]] = True
    ask_true = rng.random(len(split)) < 0.5
    color = np.array([rng.choice(np.flatnonzero(row == (want or row.all()))) for row, want in zip(present, ask_true)])
    return color, present[np.arange(len(split)), color].astype(np.int64)


def pooled_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> (N, 192): the mean colour of each 4x4 block."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255  # (N, 3, 32, 32)
    return F.avg_pool2d(x, 4).flatten(1)  # (N, 3, 8, 8) -> (N, 192)


def color_histogram(images: np.ndarray, bins: int = 4) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> (N, bins^3): fraction of the pixels in each cell of the RGB cube."""
    q = images.astype(np.int64) * bins // 256  # (N, H, W, 3) bin of each channel
    cell = ((q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]).reshape(len(images), -1)  # (N, H*W)
    counts = np.stack([np.bincount(row, minlength=bins**3) for row in cell])  # (N, bins^3)
    return torch.from_numpy(counts / cell.shape[1])


rng = np.random.default_rng(0)
questions = {name: color_questions(world[name], rng) for name in ("train", "val")}
print("true questions:", {name: round(float(q[1].mean()), 3) for name, q in questions.items()})

# %% [markdown]
# The training loop below uses the derived gradient; its first step is checked against autograd.

# %%
def bilinear_logits(W: torch.Tensor, b: torch.Tensor, phi: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """z_i = W[color_i] phi_i + b[color_i]: W (6, 2, F), b (6, 2), phi (N, F), color (N,) -> (N, 2)."""
    every = (phi @ W.reshape(-1, W.shape[-1]).T).view(len(phi), *W.shape[:2])  # (N, 6, 2): all colours' logits
    return every[torch.arange(len(phi)), color] + b[color]  # (N, 2): the asked colour's


def fit_bilinear(features, steps: int = 300, lr: float = 0.5) -> dict[str, list[float]]:
    """Full-batch gradient descent on the empirical risk with the hand-derived gradient; returns the curves."""
    (phi_tr, c_tr, y_tr), (phi_va, c_va, y_va) = features
    mu, sd = phi_tr.mean(0), phi_tr.std(0) + 1e-3  # standardise with training statistics only
    phi_tr, phi_va = (phi_tr - mu) / sd, (phi_va - mu) / sd
    W = torch.zeros(len(COLORS), 2, phi_tr.shape[1], dtype=torch.float64)
    b = torch.zeros(len(COLORS), 2, dtype=torch.float64)
    pick = F.one_hot(c_tr, len(COLORS)).double()  # (N, 6): which colour each question asks about
    log = {"step": [], "train loss": [], "val loss": [], "train acc": [], "val acc": []}
    for step in range(steps):
        z_tr = bilinear_logits(W, b, phi_tr, c_tr)
        g = (torch.softmax(z_tr, -1) - F.one_hot(y_tr, 2)) / len(y_tr)  # dR/dz = (p - onehot(y)) / N
        per_color = (pick[:, :, None] * g[:, None, :]).reshape(len(g), -1)  # (N, 6*2): g placed at its colour
        grad_W = (per_color.T @ phi_tr).view_as(W)  # (12, F) -> (6, 2, F): sum_i g_i phi_i^T per colour
        grad_b = pick.T @ g  # (6, 2)
        if step == 0:  # the hand-derived gradient equals autograd's
            Wa, ba = W.clone().requires_grad_(), b.clone().requires_grad_()
            F.cross_entropy(bilinear_logits(Wa, ba, phi_tr, c_tr), y_tr).backward()
            torch.testing.assert_close(grad_W, Wa.grad, rtol=1e-10, atol=1e-14)  # float64, same sums reordered
            torch.testing.assert_close(grad_b, ba.grad, rtol=1e-10, atol=1e-14)
        if step % 5 == 0 or step == steps - 1:  # the curves, every 5 steps
            z_va = bilinear_logits(W, b, phi_va, c_va)
            log["step"].append(step)
            log["train loss"].append(F.cross_entropy(z_tr, y_tr).item())
            log["val loss"].append(F.cross_entropy(z_va, y_va).item())
            log["train acc"].append((z_tr.argmax(-1) == y_tr).double().mean().item())
            log["val acc"].append((z_va.argmax(-1) == y_va).double().mean().item())
        W -= lr * grad_W
        b -= lr * grad_b
    return log


runs = {}
for name, phi in (("pooled pixels (192)", pooled_pixels), ("colour histogram (64)", color_histogram)):
    feats = [(phi(world[s].images), torch.from_numpy(questions[s][0]), torch.from_numpy(questions[s][1]))
             for s in ("train", "val")]
    runs[name] = fit_bilinear(feats)
print(f"{'features':24s} {'train loss':>10s} {'val loss':>9s} {'best val loss':>13s} {'train acc':>9s} {'val acc':>8s}")
for name, log in runs.items():
    print(f"{name:24s} {log['train loss'][-1]:10.3f} {log['val loss'][-1]:9.3f} {min(log['val loss']):13.3f} "
          f"{log['train acc'][-1]:9.3f} {log['val acc'][-1]:8.3f}")
pix, hist = runs["pooled pixels (192)"], runs["colour histogram (64)"]
assert hist["val acc"][-1] > 0.95 and hist["val loss"][-1] < 0.15, hist["val acc"][-1]
assert pix["train loss"][-1] < pix["train loss"][0] and pix["val loss"][-1] > min(pix["val loss"]) + 0.05

fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for ax, (name, log) in zip(axes, runs.items()):
    ax.plot(log["step"], log["train loss"], label="train")
    ax.plot(log["step"], log["val loss"], label="validation")
    ax.set(xlabel="gradient step", ylabel="cross-entropy (empirical risk)", title=name)
    ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# Both runs minimise the empirical risk: the training loss falls steadily, as it does for gradient descent with a
# small enough step on this convex objective. Only one of them generalises well: pooled pixels end at a validation
# accuracy of about 0.72 (the table), the colour histogram above 0.95. With pooled pixels, each colour word
# has its own 192 weights but only about 330 training questions, and "red somewhere" is not a linear function of
# where the red pixels fall: the validation loss turns up after a few dozen steps and the gap to the training loss
# keeps growing, the textbook picture of **overfitting**. With the colour histogram, the same six linear models see
# a feature in which the answer *is* nearly linear, and train and validation loss fall together. The lesson carries
# to every model in this book: minimising $\hat R$ is the easy part; whether its minimiser generalises is decided by
# $f$, the form of the model, which is why the rest of the chapter cares so much about what cross-attention
# computes.
#
# ## 4.2 Deriving the formulas
#
# ### Shapes through cross-attention
#
# The seed's cross-attention from modality 1 (say $n_1$ text tokens) to modality 2 ($n_2$ image regions), all of
# width $d$:
#
# $$Q_1 = X_1 W_1^Q,\quad K_2 = X_2 W_2^K,\quad V_2 = X_2 W_2^V,\qquad
# A^{(1\to2)} = \mathrm{softmax}\Big(\frac{Q_1 K_2^\top}{\sqrt{d_k}}\Big),\quad O^{(1\to2)} = A^{(1\to2)} V_2,
# \quad H_1 = \mathrm{FFN}(X_1 + O^{(1\to2)}),$$
#
# and symmetrically $2\to1$ with the roles swapped. sympy's `MatrixSymbol` keeps the sizes symbolic, so the
# shapes can be read off (and checked) before any number exists:

# %%
n1, n2, d, d_k = sp.symbols("n_1 n_2 d d_k", positive=True, integer=True)
X1, X2 = sp.MatrixSymbol("X_1", n1, d), sp.MatrixSymbol("X_2", n2, d)
WQ1, WK2 = sp.MatrixSymbol("W^Q_1", d, d_k), sp.MatrixSymbol("W^K_2", d, d_k)
WV2 = sp.MatrixSymbol("W^V_2", d, d)  # values keep the width d, so that X_1 + O type-checks
Q1, K2, V2 = X1 * WQ1, X2 * WK2, X2 * WV2
S12 = Q1 * K2.T / sp.sqrt(d_k)
A12 = sp.MatrixSymbol("A^{(1 \\to 2)}", *S12.shape)  # softmax acts row by row: same shape as S
O12 = A12 * V2
S21 = (X2 * sp.MatrixSymbol("W^Q_2", d, d_k)) * (X1 * sp.MatrixSymbol("W^K_1", d, d_k)).T / sp.sqrt(d_k)
O21 = sp.MatrixSymbol("A^{(2 \\to 1)}", *S21.shape) * (X1 * sp.MatrixSymbol("W^V_1", d, d))
for name, m in (("Q_1 = X_1 W^Q_1", Q1), ("K_2 = X_2 W^K_2", K2), ("V_2 = X_2 W^V_2", V2),
                ("S = Q_1 K_2^T / sqrt(d_k)", S12), ("A(1->2) = softmax(S)", A12), ("O(1->2) = A V_2", O12),
                ("X_1 + O(1->2)", X1 + O12), ("S(2->1) = Q_2 K_1^T / sqrt(d_k)", S21), ("O(2->1)", O21)):
    print(f"{name:32s} {str(m.shape):12s}")
assert Q1.shape == (n1, d_k) and S12.shape == (n1, n2) and O12.shape == (n1, d) == (X1 + O12).shape
assert S21.shape == (n2, n1) and O21.shape == X2.shape  # the 2->1 direction: one row per region

# %% [markdown]
# Two things the shapes say. Row $i$ of $A^{(1\to2)}$ is a distribution over the $n_2$ regions, one per text
# token: the text token "asks" (its query) and every region "answers" with its value, weighted by how well its
# key matches. And the residual $X_1 + O^{(1\to2)}$ only type-checks when the values have the width $d$ of $X_1$
# (the queries and keys may have any common width $d_k$); that is why implementations project the values, or
# the concatenated heads, back to $d$. The output of $1\to2$ has one row per text token, the output of $2\to1$
# one row per region: each modality comes out with its own shape, enriched by the other.
#
# Now with numbers. Take explicit $2\times2$, $3\times2$ symbol matrices, carry the formula through sympy, and
# compare with `mmlite.attention.CoAttention` (both directions) after copying the same weights into it. One head,
# no biases and an identity output projection make the library compute exactly the seed's formula
# (`nn.Linear` computes $xW^\top$, so its weight is our $W$ transposed).

# %%
dd = 2  # d = d_k = d_v = 2, n1 = 2 text tokens, n2 = 3 image regions
X1s, X2s = symbolic.matrix("x", 2, dd), symbolic.matrix("r", 3, dd)
W = {key: symbolic.matrix(f"{key[0].lower()}{key[1]}", dd, dd) for key in ("Q1", "K1", "V1", "Q2", "K2", "V2")}


def attend(x_q, x_kv, w_q, w_k, w_v):
    """The seed's O = softmax(X_q W^Q (X_kv W^K)^T / sqrt(d_k)) X_kv W^V, symbolically."""
    scores = (x_q * w_q) * (x_kv * w_k).T / sp.sqrt(w_q.shape[1])
    weights = symbolic.softmax_rows(scores)
    return weights * (x_kv * w_v), weights


O12s, A12s = attend(X1s, X2s, W["Q1"], W["K2"], W["V2"])
O21s, A21s = attend(X2s, X1s, W["Q2"], W["K1"], W["V1"])
assert A12s.shape == (2, 3) and A21s.shape == (3, 2) and O12s.shape == (2, 2) and O21s.shape == (3, 2)
assert symbolic.is_zero(A12s * sp.ones(3, 1) - sp.ones(2, 1))  # every row of A is a distribution
show("S^{(1\\to2)}_{11}", sp.expand(((X1s * W["Q1"]) * (X2s * W["K2"]).T)[0, 0] / sp.sqrt(2)))

rng = np.random.default_rng(1)
values = {key: rng.standard_normal((dd, dd)) for key in W}
x1_val, x2_val = rng.standard_normal((2, dd)), rng.standard_normal((3, dd))
subs = [(X1s, x1_val), (X2s, x2_val), *((W[k], values[k]) for k in W)]

co = CoAttention(dd, n_heads=1, bias=False).double()
with torch.no_grad():
    for attn, (q, k, v) in ((co.attn_1to2, ("Q1", "K2", "V2")), (co.attn_2to1, ("Q2", "K1", "V1"))):
        for lin, key in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v)):
            lin.weight.copy_(torch.from_numpy(values[key].T))  # nn.Linear holds W^T
        attn.out_proj.weight.copy_(torch.eye(dd, dtype=torch.float64))
    o12_lib, o21_lib, a12_lib, a21_lib = co(torch.from_numpy(x1_val)[None], torch.from_numpy(x2_val)[None],
                                            need_weights=True)
# sympy's evalf and float64 torch agree to ~1e-15; 1e-12 leaves room and still catches any wrong index
for sym, lib in ((O12s, o12_lib[0]), (O21s, o21_lib[0]), (A12s, a12_lib[0, 0]), (A21s, a21_lib[0, 0])):
    torch.testing.assert_close(lib, torch.from_numpy(symbolic.evaluate(sym, subs)), rtol=1e-12, atol=1e-12)
print("A(1->2) (text tokens x image regions):\n", np.round(symbolic.evaluate(A12s, subs), 3))
print("O(1->2) and O(2->1): sympy and mmlite.attention.CoAttention agree")

# %% [markdown]
# The last step of the seed's formula, $H_1 = \mathrm{FFN}(X_1 + O^{(1\to2)})$, is where the library adds two
# standard refinements, and it is worth being exact about them. `mmlite.fusion.CrossAttentionFusion` runs, per
# layer and per modality,
#
# $$X_1' = X_1 + \mathrm{MHA}\big(\mathrm{LN}(X_1), \mathrm{LN}(X_2)\big),\qquad
# H_1 = X_1' + \mathrm{FFN}\big(\mathrm{LN}(X_1')\big),$$
#
# that is: the attention output is added to the original features (the seed's $X_1 + O$), the inputs of each
# sub-layer are layer-normalised first ("pre-norm", which keeps deep stacks trainable), the FFN also gets a
# residual, and attention has $h$ heads, each the seed's formula on a $d/h$-wide slice, concatenated and mixed by
# $W^O$. The cell below rebuilds one such layer from scratch in NumPy (LayerNorm, GELU and the heads written out,
# attention from `mmlite.numpy_attention`, biases folded in by appending a column of ones to $X$ and the bias as
# a last row of $W$) and checks it against the library's layer with the same weights.

# %%
def np_layer_norm(x: np.ndarray, ln: torch.nn.LayerNorm) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * gamma + beta over the last axis (biased variance, as torch)."""
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.eps) * ln.weight.detach().numpy() + ln.bias.detach().numpy()


def with_bias(lin: torch.nn.Linear) -> np.ndarray:
    """nn.Linear's y = x W^T + b as one matrix acting on [x, 1]: (d_in + 1, d_out)."""
    return np.vstack([lin.weight.detach().numpy().T, lin.bias.detach().numpy()[None]])


def np_mha(x: np.ndarray, ctx: np.ndarray, attn: CrossAttention) -> np.ndarray:
    """Multi-head cross-attention: each head is the seed's formula on its d/h slice; heads concatenated, W^O."""
    ones = lambda a: np.concatenate([a, np.ones((*a.shape[:-1], 1))], -1)  # noqa: E731  (..., n, d + 1)
    wq, wk, wv = with_bias(attn.q_proj), with_bias(attn.k_proj), with_bias(attn.v_proj)  # (d + 1, d)
    hd = attn.head_dim
    heads = [cross_attention_forward(ones(x), ones(ctx), wq[:, h * hd:(h + 1) * hd], wk[:, h * hd:(h + 1) * hd],
                                     wv[:, h * hd:(h + 1) * hd])[0] for h in range(attn.n_heads)]
    return ones(np.concatenate(heads, -1)) @ with_bias(attn.out_proj)  # (B, n, d)


def np_ffn(x: np.ndarray, ff) -> np.ndarray:
    """W2 GELU(W1 x + b1) + b2 with the exact GELU(u) = u Phi(u)."""
    h = x @ ff.linear1.weight.detach().numpy().T + ff.linear1.bias.detach().numpy()
    h = h * 0.5 * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    return h @ ff.linear2.weight.detach().numpy().T + ff.linear2.bias.detach().numpy()


layer = model.fusion.layers[0].double()  # the (still untrained) cross-attention fusion layer of 4.1's model
xi = np.random.default_rng(2).standard_normal((2, 16, cfg.d_model))  # 16 image regions
xt = np.random.default_rng(3).standard_normal((2, 9, cfg.d_model))  # 9 text tokens
li, lt = np_layer_norm(xi, layer.norm_i), np_layer_norm(xt, layer.norm_t)
xi1 = xi + np_mha(li, lt, layer.co_attn.attn_1to2)  # X_1' = X_1 + MHA(LN(X_1), LN(X_2))
xt1 = xt + np_mha(lt, li, layer.co_attn.attn_2to1)
hi = xi1 + np_ffn(np_layer_norm(xi1, layer.ff_norm_i), layer.ff_i)  # H_1 = X_1' + FFN(LN(X_1'))
ht = xt1 + np_ffn(np_layer_norm(xt1, layer.ff_norm_t), layer.ff_t)
with torch.no_grad():
    hi_lib, ht_lib = layer(torch.from_numpy(xi), torch.from_numpy(xt), None, None)
model.float()
# float64 on both sides; different summation orders leave ~1e-14 differences on O(1) values
np.testing.assert_allclose(hi, hi_lib.numpy(), rtol=1e-10, atol=1e-10)
np.testing.assert_allclose(ht, ht_lib.numpy(), rtol=1e-10, atol=1e-10)
print(f"from-scratch NumPy layer == mmlite fusion layer: image {hi.shape}, text {ht.shape}")

# %% [markdown]
# ### Why divide by $\sqrt{d_k}$
#
# Take one query $q$ and one key $k$ in $\mathbb{R}^{d_k}$ whose components are independent with mean 0 and
# variance 1 (what a freshly initialised projection of normalised features gives). Each term $q_i k_i$ has
#
# $$\mathbb{E}[q_i k_i] = \mathbb{E}[q_i]\,\mathbb{E}[k_i] = 0,\qquad
# \mathbb{E}[(q_i k_i)^2] = \mathbb{E}[q_i^2]\,\mathbb{E}[k_i^2] = 1,$$
#
# so $\mathrm{Var}(q_i k_i) = 1$; for $i \ne j$ the covariance $\mathbb{E}[q_ik_iq_jk_j] - 0 =
# \mathbb{E}[q_i]\mathbb{E}[k_i]\mathbb{E}[q_j]\mathbb{E}[k_j] = 0$, and variances of uncorrelated terms add:
# $\mathrm{Var}(q\cdot k) = d_k$. The raw score's standard deviation grows like $\sqrt{d_k}$ (8 for $d_k = 64$),
# and dividing by $\sqrt{d_k}$ brings it back to 1 for every width. The derivation in `sympy.stats`, from the
# distributions alone: $q$ and $k$ are vectors of independent normal random variables (standard deviations
# $\sigma_q$, $\sigma_k$ kept as symbols); sympy computes the variance of one term $q_ik_i$ and the covariance of
# two, the variance of the sum follows as $\sum_i \mathrm{Var}(q_ik_i) + 2\sum_{i<j}\mathrm{Cov}(q_ik_i, q_jk_j)$,
# and the result is checked against the exact variance of the whole dot product that sympy computes for
# $d_k = 1, 2, 3$:

# %%
from sympy.stats import Normal, covariance, variance  # noqa: E402

s_q, s_k = sp.symbols("sigma_q sigma_k", positive=True)  # standard deviations of the components
i = sp.symbols("i", integer=True, positive=True)


def normal_vectors(d: int, mean_q=0, mean_k=0) -> tuple[list, list]:
    """q and k in R^d with independent normal components N(mean_q, s_q^2) and N(mean_k, s_k^2)."""
    return ([Normal(f"q_{j}", mean_q, s_q) for j in range(d)], [Normal(f"k_{j}", mean_k, s_k) for j in range(d)])


q_vec, k_vec = normal_vectors(2)
var_term = sp.simplify(variance(q_vec[0] * k_vec[0]))  # Var(q_i k_i), from the distributions
cov_term = sp.simplify(covariance(q_vec[0] * k_vec[0], q_vec[1] * k_vec[1]))  # Cov(q_i k_i, q_j k_j), i != j
var_dot = sp.summation(var_term, (i, 1, d_k)) + 2 * sp.binomial(d_k, 2) * cov_term  # Var of a sum of d_k terms
for d in (1, 2, 3):  # the exact variance of the whole dot product, computed by sympy.stats
    q_d, k_d = normal_vectors(d)
    assert sp.simplify(variance(sum(a * b for a, b in zip(q_d, k_d))) - var_dot.subs(d_k, d)) == 0, d
unit = {s_q: 1, s_k: 1}
assert sp.simplify(var_dot.subs(unit) - d_k) == 0 and sp.simplify(var_dot.subs(unit) / d_k - 1) == 0
show(r"\mathrm{Var}(q_ik_i)", var_term)
show(r"\mathrm{Cov}(q_ik_i,\ q_jk_j)", cov_term)
show(r"\mathrm{Var}(q\cdot k)", sp.simplify(var_dot))
show(r"\mathrm{Var}\big(q\cdot k/\sqrt{d_k}\big)\big|_{\sigma_q = \sigma_k = 1}", sp.simplify(var_dot.subs(unit) / d_k))

# %% [markdown]
# A simulation agrees (4000 query/key pairs per width, unit-normal components):

# %%
rng = np.random.default_rng(0)
widths = [4, 16, 64, 256, 1024]
print(f"{'d_k':>5s} {'Var(q.k)/d_k':>13s} {'Var(q.k/sqrt(d_k))':>19s}")
for dk in widths:
    q, k = rng.standard_normal((2, 4000, dk))
    dots = (q * k).sum(-1)
    print(f"{dk:5d} {dots.var() / dk:13.2f} {(dots / math.sqrt(dk)).var():19.2f}")
    assert abs(dots.var() / dk - 1) < 0.15, dk  # the standard error of a variance from 4000 samples is < 5%

# %% [markdown]
# Why the scale matters is in the softmax's gradient. With scores of standard deviation $\sqrt{d_k}$ the largest
# one wins by a margin that grows with $d_k$, the softmax output tends to one-hot, and its Jacobian
# $\mathrm{diag}(a) - aa^\top$ (derived below) tends to zero: a saturated attention layer passes almost no
# gradient to its queries and keys, and stops learning. The cell measures it for one query against 16 keys,
# averaged over 500 draws, with and without the scale:

# %%
def jacobian_norm(a: np.ndarray) -> np.ndarray:
    """Frobenius norm of diag(a) - a a^T for each row a: (N, n) -> (N,)."""
    jac = np.einsum("ni,ij->nij", a, np.eye(a.shape[-1])) - a[:, :, None] * a[:, None, :]  # (N, n, n)
    return np.sqrt((jac**2).sum((1, 2)))


rng = np.random.default_rng(0)
dks = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
stats = {"unscaled": [], "scaled": [], "unscaled max a": [], "scaled max a": []}
for dk in dks:
    q, keys = rng.standard_normal((500, 1, dk)), rng.standard_normal((500, 16, dk))
    s = (q * keys).sum(-1)  # (500, 16) raw scores
    for name, scores in (("unscaled", s), ("scaled", s / math.sqrt(dk))):
        a = softmax(scores)
        stats[name].append(jacobian_norm(a).mean())
        stats[name + " max a"].append(a.max(-1).mean())
print(f"{'d_k':>5s} {'|J| unscaled':>12s} {'|J| scaled':>10s} {'max a unscaled':>14s} {'max a scaled':>12s}")
for row, dk in enumerate(dks):
    if dk in (1, 16, 64, 1024):
        print(f"{dk:5d} {stats['unscaled'][row]:12.3f} {stats['scaled'][row]:10.3f} "
              f"{stats['unscaled max a'][row]:14.3f} {stats['scaled max a'][row]:12.3f}")
assert stats["unscaled"][-1] < 0.2 * stats["scaled"][-1]  # the unscaled Jacobian has collapsed at d_k = 1024
assert max(stats["scaled"]) - min(stats["scaled"][2:]) < 0.1  # the scaled one stays put (d_k >= 4)

fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for name in ("unscaled", "scaled"):
    axes[0].plot(dks, stats[name], marker="o", label=name)
    axes[1].plot(dks, stats[name + " max a"], marker="o", label=name)
for ax, label in zip(axes, ("mean Frobenius norm of the softmax Jacobian", "mean largest attention weight")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("$d_k$")
    ax.set_ylabel(label, fontsize=8)
    ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# Without the scale, at $d_k = 64$ (the width of the model in 4.3) the largest weight already averages above
# 0.7 and the Jacobian has lost about 40 % of its size (0.183 against 0.304); at $d_k = 1024$ attention is essentially an argmax
# with a vanishing gradient. With the scale, both stay where they were at $d_k = 4$.
#
# ### The softmax Jacobian
#
# For $a = \mathrm{softmax}(s)$, $a_i = e^{s_i} / \sum_l e^{s_l}$, the quotient rule gives
# $\partial a_i / \partial s_j = a_i[i=j] - a_i a_j$, i.e.
#
# $$J = \frac{\partial a}{\partial s} = \mathrm{diag}(a) - a a^\top.$$
#
# $J$ is symmetric, and its rows sum to zero ($J\mathbf 1 = a - a(a^\top\mathbf 1) = 0$: adding a constant to
# every score changes nothing). For a loss $L$ with upstream gradient $\bar a = \partial L/\partial a$, the
# chain rule gives $\bar s = J^\top \bar a = a \odot (\bar a - (a^\top \bar a)\mathbf 1)$, never forming $J$.

# %%
s_vec = symbolic.vector("s", 4)
a_vec = symbolic.softmax(s_vec)
J = a_vec.jacobian(s_vec)
assert symbolic.equal(J, sp.diag(*a_vec) - a_vec * a_vec.T)  # symbolic: J = diag(a) - a a^T
assert symbolic.is_zero(J * sp.ones(4, 1))  # rows sum to 0
abar = symbolic.vector(r"\bar{a}", 4)
assert symbolic.equal(J.T * abar, a_vec.multiply_elementwise(abar - (a_vec.T * abar)[0] * sp.ones(4, 1)))
show(r"\frac{\partial a_1}{\partial s_2}", sp.simplify(J[0, 1]))

s0 = torch.randn(4, generator=gen, dtype=torch.float64)
J_autograd = torch.autograd.functional.jacobian(lambda v: torch.softmax(v, 0), s0)
a0 = torch.softmax(s0, 0)
torch.testing.assert_close(J_autograd, torch.diag(a0) - torch.outer(a0, a0), rtol=1e-12, atol=1e-14)
torch.testing.assert_close(J_autograd, torch.from_numpy(symbolic.evaluate(J, {s_vec: s0.numpy()})),
                           rtol=1e-12, atol=1e-14)
print("softmax Jacobian: symbolic, formula and autograd agree")

# %% [markdown]
# ### The gradients of attention with respect to $Q$, $K$ and $V$
#
# Write one head as a chain of simple maps, $S = QK^\top/\sqrt{d_k}$, $A = \mathrm{softmax}_\text{rows}(S)$,
# $O = AV$, and let $\bar O = \partial L/\partial O$ come from above (a bar means "gradient of the loss with
# respect to"). Backpropagation walks the chain backwards, one map at a time; for a map $Y = f(X)$ it asks which
# $\bar X$ satisfies $\langle \bar Y, dY\rangle = \langle \bar X, dX\rangle$ for every small change $dX$:
#
# | step | forward | backward |
# |---|---|---|
# | 1 | $O = AV$ | $\bar V = A^\top \bar O$, $\quad\bar A = \bar O V^\top$ |
# | 2 | $A = \mathrm{softmax}_\text{rows}(S)$ | $\bar S = A \odot (\bar A - \mathrm{rowsum}(\bar A \odot A))$ (the Jacobian above, row by row) |
# | 3 | $S = QK^\top/\sqrt{d_k}$ | $\bar Q = \bar S K/\sqrt{d_k}$, $\quad\bar K = \bar S^\top Q/\sqrt{d_k}$ |
#
# Each step is checked in sympy on its own, with the upstream gradient a matrix of free symbols $G$ (so that
# $L = \langle G, Y\rangle$ has exactly $\partial L/\partial Y = G$), on a $2\times3$ attention with
# $d_k = d_v = 2$:

# %%
nq, nk, dh = 2, 3, 2
Qs, Ks, Vs = symbolic.matrix("q", nq, dh), symbolic.matrix("k", nk, dh), symbolic.matrix("v", nk, dh)
As, Ss = symbolic.matrix("a", nq, nk), symbolic.matrix("s", nq, nk)
G_O, G_A, G_S = symbolic.matrix("g", nq, dh), symbolic.matrix(r"\bar{a}", nq, nk), symbolic.matrix(r"\bar{s}", nq, nk)
inner = lambda G, Y: sum(G.multiply_elementwise(Y))  # noqa: E731  <G, Y>, so that dL/dY = G

L1 = inner(G_O, As * Vs)  # step 1: O = A V
assert symbolic.equal(symbolic.gradient(L1, Vs), As.T * G_O)
assert symbolic.equal(symbolic.gradient(L1, As), G_O * Vs.T)
A_of_S = symbolic.softmax_rows(Ss)  # step 2: A = softmax_rows(S)
L2 = inner(G_A, A_of_S)
rowsum = (G_A.multiply_elementwise(A_of_S)) * sp.ones(nk, 1) * sp.ones(1, nk)  # (nq, nk), each row its sum
assert symbolic.equal(symbolic.gradient(L2, Ss), A_of_S.multiply_elementwise(G_A - rowsum))
L3 = inner(G_S, Qs * Ks.T / sp.sqrt(dh))  # step 3: S = Q K^T / sqrt(d_k)
assert symbolic.equal(symbolic.gradient(L3, Qs), G_S * Ks / sp.sqrt(dh))
assert symbolic.equal(symbolic.gradient(L3, Ks), G_S.T * Qs / sp.sqrt(dh))
print("steps 1-3: every backward formula equals sympy's derivative")

# numeric: the three steps chained, against autograd through mmlite's attention (float64)
q_t, k_t, v_t = (torch.randn(2, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
out, A_t = scaled_dot_product_attention(q_t, k_t, v_t)
g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
(out * g_out).sum().backward()
A_t = A_t.detach()
dV = A_t.transpose(-2, -1) @ g_out
dA = g_out @ v_t.detach().transpose(-2, -1)
dS = A_t * (dA - (dA * A_t).sum(-1, keepdim=True))
dQ, dK = dS @ k_t.detach() / math.sqrt(8), dS.transpose(-2, -1) @ q_t.detach() / math.sqrt(8)
for name, mine, ref in (("V", dV, v_t.grad), ("Q", dQ, q_t.grad), ("K", dK, k_t.grad)):
    torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)  # float64, reordered sums: ~1e-15
print("dV = A^T dO, dQ = dS K / sqrt(d_k), dK = dS^T Q / sqrt(d_k): equal to autograd")

# %% [markdown]
# ### Cross-attention in NumPy, with the backward pass by hand
#
# Two more chain-rule steps reach the inputs and weights: $Q = X_1W^Q$ gives $\bar X_1 = \bar Q (W^Q)^\top$ and
# $\bar W^Q = X_1^\top \bar Q$; $X_2$ feeds both $K$ and $V$, so its gradient is the sum
# $\bar X_2 = \bar K (W^K)^\top + \bar V (W^V)^\top$. `mmlite.numpy_attention` implements exactly the table:
# a forward pass that returns the output and a cache, and a backward pass that turns $\bar O$ into the five
# gradients. The backward is short enough to read whole:

# %%
print(inspect.getsource(cross_attention_backward))

# %% [markdown]
# It is checked against PyTorch's autograd in float64 (a batch of 2, 5 text tokens attending to 16 image
# regions, different widths for the two modalities so that no transpose can hide), and against central finite
# differences, which need nothing but the forward pass:

# %%
rng = np.random.default_rng(0)
x1n, x2n = rng.standard_normal((2, 5, 12)), rng.standard_normal((2, 16, 20))
wqn, wkn, wvn = rng.standard_normal((12, 8)) / 12**0.5, rng.standard_normal((20, 8)) / 20**0.5, \
    rng.standard_normal((20, 6)) / 20**0.5
out_np, cache = cross_attention_forward(x1n, x2n, wqn, wkn, wvn)
g_np = rng.standard_normal(out_np.shape)
grads_np = cross_attention_backward(g_np, cache)

leaves = [torch.tensor(a, requires_grad=True) for a in (x1n, x2n, wqn, wkn, wvn)]
out_t, _ = scaled_dot_product_attention(leaves[0] @ leaves[2], leaves[1] @ leaves[3], leaves[1] @ leaves[4])
(out_t * torch.from_numpy(g_np)).sum().backward()
rel = {"O": np.abs(out_np - out_t.detach().numpy()).max() / np.abs(out_t.detach().numpy()).max()}
for name, mine, leaf in zip(grads_np._fields, grads_np, leaves):
    rel["d" + name] = np.abs(mine - leaf.grad.numpy()).max() / np.abs(leaf.grad.numpy()).max()
assert max(rel.values()) < 1e-12, rel  # float64: a few ulps (~1e-16 relative) per operation
print("NumPy forward and all five hand-derived gradients match autograd; max relative error < 1e-12")

small = [rng.standard_normal(s) for s in ((2, 3), (4, 3), (3, 2), (3, 2), (3, 2))]  # x1, x2, WQ, WK, WV
g_small = rng.standard_normal((2, 2))
grads_small = cross_attention_backward(g_small, cross_attention_forward(*small)[1])
for idx, name in enumerate(grads_small._fields):
    def loss_of(value, idx=idx):
        args = list(small)
        args[idx] = value
        return float((cross_attention_forward(*args)[0] * g_small).sum())
    # central differences, eps = 1e-6: truncation ~1e-12 plus rounding ~1e-10, so 1e-7 is a safe bound
    np.testing.assert_allclose(grads_small[idx], finite_difference(loss_of, small[idx]), rtol=1e-7, atol=1e-8)
print("... and finite differences, to 1e-7 relative")

# %% tags=[]
# NBVAL_IGNORE_OUTPUT
# the measured relative errors themselves depend on the machine's floating-point summation order
print({name: f"{value:.1e}" for name, value in rel.items()})

# %% [markdown]
# ### The contrastive loss and its temperature
#
# CLIP-style training (chapter 3) scores a batch of $B$ image-text pairs with the logits
# $S = \frac1\tau\, \hat I \hat T^\top$ (cosine similarities $C = \hat I \hat T^\top$ of L2-normalised features,
# divided by the temperature $\tau$; `LogitScale` learns $1/\tau$), and averages a cross-entropy over the rows
# (each image picks its text) and one over the columns (each text picks its image):
#
# $$L = \frac12\Big(\frac1B\sum_i \mathrm{CE}(S_{i,:}, i) + \frac1B\sum_j \mathrm{CE}(S_{:,j}, j)\Big).$$
#
# Each direction is a batch of ordinary cross-entropies, so the first result of this chapter applies entry by
# entry: with $P^\text{row} = \mathrm{softmax}_\text{rows}(S)$ and $P^\text{col}$ the column-wise softmax,
#
# $$\frac{\partial L}{\partial S} = \frac12\Big(\frac{P^\text{row} - I}{B} + \frac{P^\text{col} - I}{B}\Big),
# \qquad \frac{\partial L}{\partial C} = \frac1\tau\,\frac{\partial L}{\partial S}.$$
#
# The positive pair $(i, i)$ is pulled up with strength $(1 - P_{ii})$; every negative $(i, j)$ is pushed down
# with strength $P_{ij}$, its share of the softmax. sympy checks the formula on a $3\times3$ batch, and autograd
# through `mmlite.objectives.contrastive_loss` checks it on a real one:

# %%
B = 3
Sc = symbolic.matrix("s", B, B)
P_row, P_col = symbolic.softmax_rows(Sc), symbolic.softmax_rows(Sc.T).T
L_clip = sp.Rational(1, 2) * (sum(-sp.log(P_row[k, k]) for k in range(B)) / B
                              + sum(-sp.log(P_col[k, k]) for k in range(B)) / B)
assert symbolic.equal(symbolic.gradient(L_clip, Sc), ((P_row - sp.eye(B)) + (P_col - sp.eye(B))) / (2 * B))
print("dL/dS = ((P_row - I) + (P_col - I)) / 2B: symbolic")

img_f = torch.randn(8, 16, generator=gen, dtype=torch.float64, requires_grad=True)
txt_f = torch.randn(8, 16, generator=gen, dtype=torch.float64, requires_grad=True)
loss_c, S_t = contrastive_loss(img_f, txt_f, logit_scale=1 / 0.07, return_logits=True)
S_t.retain_grad()
loss_c.backward()
eye = torch.eye(8, dtype=torch.float64)
expected = ((torch.softmax(S_t, 1) - eye) + (torch.softmax(S_t, 0) - eye)) / (2 * 8)
torch.testing.assert_close(S_t.grad, expected.detach(), rtol=1e-10, atol=1e-14)
print("... and equal to autograd through mmlite.objectives.contrastive_loss")

# %% [markdown]
# What does $\tau$ do to that gradient? Take a batch of 32 pairs whose text features are the image features
# plus noise (a half-trained model), and look at $\partial L/\partial C$ for temperatures from 0.003 to 3: its
# size, and how the push on the negatives is distributed, measured as the share that goes to each row's hardest
# negative (the most similar wrong text). A uniform push would give that negative $1/31 \approx 0.032$.

# %%
g_tau = torch.Generator().manual_seed(0)
img32 = F.normalize(torch.randn(32, 16, generator=g_tau, dtype=torch.float64), dim=-1)
txt32 = F.normalize(img32 + 0.8 * torch.randn(32, 16, generator=g_tau, dtype=torch.float64) / 4, dim=-1)
cos = (img32 @ txt32.T).requires_grad_()
taus = np.logspace(-2.5, 0.5, 25)
grad_norm, hardest_share = [], []
off_diag = ~torch.eye(32, dtype=torch.bool)
for tau in taus:
    cos.grad = None
    S_tau = cos / tau
    labels = torch.arange(32)
    (0.5 * (cross_entropy(S_tau, labels) + cross_entropy(S_tau.T, labels))).backward()
    grad_norm.append(cos.grad.norm().item())
    push = cos.grad.clamp_min(0) * off_diag  # the negatives' gradients are positive (they are pushed down)
    hardest_share.append((push.max(1).values / push.sum(1)).mean().item())
print(f"{'tau':>6s} {'|dL/dC|':>8s} {'hardest negative share':>23s}")
for tau in (0.01, 0.07, 1.0):
    idx = int(np.argmin(np.abs(np.log(taus / tau))))
    print(f"{taus[idx]:6.3f} {grad_norm[idx]:8.3f} {hardest_share[idx]:23.3f}")
assert hardest_share[0] > 0.6 and hardest_share[-1] < 0.06 and np.all(np.diff(hardest_share) < 0)
peak = taus[int(np.argmax(grad_norm))]
# where the gradient goes at tau = 0.01: every image here already ranks its own text first (and every text its
# image); what is left comes from the rows and columns whose margin (own cosine minus the best wrong one) is smallest
cos.grad = None
S_small = cos / 0.01
(0.5 * (cross_entropy(S_small, labels) + cross_entropy(S_small.T, labels))).backward()
c = cos.detach()
others = c.masked_fill(~off_diag, -2.0)  # the wrong pairs only
margin_row, margin_col = c.diag() - others.max(1).values, c.diag() - others.max(0).values  # (32,) each
closest = torch.zeros(32, 32, dtype=torch.bool)
closest[margin_row.argsort()[:3]] = True  # the 3 images with the smallest margins ...
closest[:, margin_col.argsort()[:3]] = True  # ... and the 3 texts
mass = cos.grad.abs()
on_closest = (mass * closest).sum() / mass.sum()
print(f"|dL/dC| peaks at tau = {peak:.2f}; at tau = 0.01 all {int((margin_row > 0).sum())} images rank their own "
      f"text first, and the 3 images and 3 texts with the smallest margins carry {on_closest:.3f} of the gradient")
assert 0.05 < peak < 1.0 and grad_norm[int(np.argmin(np.abs(taus - 0.01)))] < 0.1 * max(grad_norm) and on_closest > 0.95

fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot(taus, grad_norm, marker=".")
axes[0].set_ylabel(r"$\|\partial L / \partial C\|_F$")
axes[1].plot(taus, hardest_share, marker=".")
axes[1].axhline(1 / 31, color="grey", ls=":", label="uniform push (1/31)")
axes[1].set_ylabel("share of the push on the hardest negative", fontsize=8)
axes[1].legend(fontsize=7)
for ax in axes:
    ax.set_xscale("log")
    ax.set_xlabel(r"temperature $\tau$")
    ax.axvline(0.07, color="red", ls="--", lw=0.8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Temperature is a dial between two behaviours. At large $\tau$ the softmax is nearly uniform: every negative is
# pushed equally and weakly, and the gradient is small. As $\tau$ falls the push concentrates on the few
# negatives that are closest to the positive (at $\tau = 0.01$, most of it goes to one text per row): the loss
# does **hard-negative mining** by itself. The size of the gradient is not monotone in $\tau$: it grows as $\tau$
# falls, peaks near $\tau \approx 0.2$, and then collapses (0.001 at $\tau = 0.01$), although $\partial L/\partial
# C$ carries a factor $1/\tau$. At a small temperature every row whose own text is already the most similar has
# $P_{ii} \approx 1$ and contributes almost nothing. In this batch every pair is already ranked right, and what
# gradient is left comes from the three images and three texts whose margin over their hardest negative is the
# smallest (they carry nearly all of it, the cell shows); with pairs ranked wrong, those would take it all. Too
# small a $\tau$ therefore trains only on the current mistakes and the nearest calls, and ignores the rest; CLIP's
# initial $\tau = 0.07$ (red line) sits between, and learning $\tau$ lets the model move the dial as its features
# improve.
#
# Every formula of this section now has a symbolic proof and a numeric check against the library
# (`mmlite.objectives.cross_entropy`, `mmlite.attention`, the fusion layer, `mmlite.numpy_attention`,
# `contrastive_loss`). Time to use them.
#
# ## 4.3 The case: image-text matching
#
# The seed article's worked example, in its own order: *a CNN extracts image features; word embeddings and an
# RNN extract text features; cross-attention lets each modality attend to the other; the attention outputs are
# added to the original features and passed through a feed-forward network; the two fused representations are
# concatenated and classified as match / no match.* That sentence is `MatchingModel` with
# `image_encoder="cnn", text_encoder="gru", fusion="cross_attention"`:

# %%
W_BOX, H_BOX = 1.9, 0.55
centres = {  # box centres in data units: image path on top, text path below, one column per stage
    "image": (0.95, 2.5), "cnn": (3.35, 2.5), "i2t": (5.75, 2.5), "res_i": (8.15, 2.5),
    "ids": (0.95, 0.7), "gru": (3.35, 0.7), "t2i": (5.75, 0.7), "res_t": (8.15, 0.7), "classify": (10.55, 1.6)}
labels = {"image": "image (3, 32, 32)", "cnn": "CNN: 3 stride-2 stages\n-> 4x4 regions (16, 64)",
          "i2t": "regions attend to words\nO(i->t): (16, 64)", "res_i": "X + O, then + FFN\n-> pool (64,)",
          "ids": "caption ids (T,)", "gru": "word embeddings +\nGRU -> tokens (T, 64)",
          "t2i": "words attend to regions\nO(t->i): (T, 64)", "res_t": "X + O, then + FFN\n-> pool (64,)",
          "classify": "concat (128,) -> MLP\n-> P(match)"}
fig, ax = plt.subplots(figsize=(10, 3.3))
for key, centre in centres.items():
    color = "#f5e6cc" if key in ("image", "ids") else "#d8f0d8" if key == "classify" else "#dde8f5"
    mmlite.plot.box(ax, centre, labels[key], w=W_BOX, h=H_BOX, color=color)


def edge(a: str, b: str, dy: float = 0.0) -> None:
    """An arrow from the right side of box a to the left side of box b (dy: vertical offset at b)."""
    (xa, ya), (xb, yb) = centres[a], centres[b]
    mmlite.plot.arrow(ax, (xa + W_BOX / 2, ya), (xb - W_BOX / 2, yb + dy))


for a, b in (("image", "cnn"), ("cnn", "i2t"), ("i2t", "res_i"), ("ids", "gru"), ("gru", "t2i"), ("t2i", "res_t")):
    edge(a, b)
edge("cnn", "t2i", 0.15)  # each modality gives the other its keys and values
edge("gru", "i2t", -0.15)
edge("res_i", "classify", 0.15)
edge("res_t", "classify", -0.15)
ax.set_xlim(-0.1, 11.6)
ax.set_ylim(0.2, 2.9)
ax.axis("off")
plt.show()

# %% [markdown]
# Walking one batch through the model's own modules, with the shape after each step, shows the same sentence
# in code (the walk must reproduce `model(...)` exactly):

# %%
batch_texts = [world["test"].captions[k][1] for k in range(3)]  # 3 test images, one caption each
print(batch_texts)
ids, mask = tokenizer.encode_batch(batch_texts, add_bos_eos=True, strict=True)  # [BOS] words [EOS] [PAD]...
images = world["test"].image_tensor([0, 1, 2])  # (3, 3, 32, 32) float in [0, 1]
model.eval()
with torch.no_grad():
    steps = [("images", images), ("caption ids", ids)]
    regions = model.image_encoder(images).tokens  # CNN -> region tokens
    words = model.text_encoder(ids, mask).tokens  # embeddings + GRU -> word tokens
    steps += [("CNN region features", regions), ("GRU word features", words)]
    fu = model.fusion
    xi, xt = fu.image_proj(regions), fu.text_proj(words)
    lay = fu.layers[0]
    o_i, o_t, w_it, w_ti = lay.co_attn(lay.norm_i(xi), lay.norm_t(xt), mask2=mask, need_weights=True)
    steps += [("weights image->text", w_it), ("weights text->image", w_ti), ("O(image->text)", o_i),
              ("O(text->image)", o_t)]
    xi, xt = xi + o_i, xt + o_t  # attention output added to the original features
    xi, xt = xi + lay.ff_i(lay.ff_norm_i(xi)), xt + lay.ff_t(lay.ff_norm_t(xt))  # ... and through the FFN
    steps += [("H_image", xi), ("H_text", xt)]
    pooled_i = fu.norm_i(xi).mean(1)  # every region is real
    pooled_t = (fu.norm_t(xt) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean over real words
    fused = torch.cat([pooled_i, pooled_t], -1)
    logits_walk = model.classifier(fused)
    steps += [("concatenated", fused), ("match logits", logits_walk)]
    for name, t in steps:
        print(f"{name:22s} {str(tuple(t.shape)):18s}")
    torch.testing.assert_close(logits_walk, model(images, ids, mask), rtol=1e-5, atol=1e-6)  # float32 reorderings
model.train()
print("the walk reproduces model(images, ids, mask)")

# %% [markdown]
# The weights `text->image` have shape (batch, heads, words, regions): for every word, a distribution over the
# 16 regions of the $4\times4$ grid. That is the map to look at once the model is trained.
#
# ### Training, and how many steps
#
# The training pairs come from `train_matching`: each image with one of its captions (label 1) and one false
# caption (label 0), which is, with probability `hard_fraction = 0.5`, the image's own **hard negative** (same
# words, broken meaning: swapped attributes, a swapped relation, or a changed colour) and otherwise another
# image's caption (an *easy* negative, labelled by checking it against the scene, since "a red circle" can be
# true of many images). A batch of 64 images gives 128 pairs, about half of them positive.
#
# How long to train, and against which baseline, was decided on a sweep: the recipe that chapter 3 uses too
# (`mmlite.sweep`: AdamW at $2\cdot10^{-3}$, warm-up over a tenth of the steps, 64 images a step, half of the false
# captions hard negatives), run with three seeds (the seed sets the initial weights, the order of the images and
# the choice of negatives) by `python -m mmlite sweep`, which stores every run in `data/sweeps/matching.json`.
# Besides the two models it holds a third: the concatenation baseline has 16.5 thousand fusion parameters and no
# feed-forward network, cross-attention 108.5 thousand and an FFN, so a difference between them could be capacity
# rather than mechanism. `concat_mlp` widens the baseline's classifier (hidden width 768) until fusion and
# classifier together hold as many parameters as cross-attention's. The table gives the mean and standard
# deviation over the seeds of the accuracy on the test split and on the compositional split `comp`, whose every
# image holds one of the six colour-shape pairs ("red triangle", "blue circle", ...) that never occur in a
# training image. It is loaded from the file, so it is the same on every machine.

# %%
from mmlite.sweep import build_matching, load_sweep, train_recipe  # noqa: E402

sweep = load_sweep()
ABLATION = ["cross_attention", "concat", "concat_mlp"]
names = {"cross_attention": "cross-attn", "concat": "concat", "concat_mlp": "concat+MLP"}


def sweep_values(variant: str, steps: int, key: str = "accuracy", split: str = "test") -> np.ndarray:
    """One figure of every seed of a variant at `steps`, in seed order."""
    runs_v = sorted((r for r in sweep["runs"] if r["variant"] == variant and r["steps"] == steps),
                    key=lambda r: r["seed"])
    return np.array([r[split][key] for r in runs_v])


for v in ABLATION:
    size = build_matching(v, len(tokenizer), seed=0)
    print(f"{names[v]:12s} fusion + classifier: {mmlite.utils.count_parameters(size.fusion) + mmlite.utils.count_parameters(size.classifier):7,d} parameters")
print(f"\n{'steps':>5s} " + "".join(f"{names[v] + ' ' + s:>19s}" for s in ("test", "comp") for v in ABLATION))
for steps in (300, 600):
    print(f"{steps:5d} " + "".join(f"{sweep_values(v, steps, split=s).mean():10.3f} +- {sweep_values(v, steps, split=s).std(ddof=1):.3f}"
                                   for s in ("test", "comp") for v in ABLATION))
print("\ntest accuracy of cross-attention minus each baseline, seed by seed (same seed = same encoders, batches, pairs):")
for steps in (300, 600):
    for base in ("concat", "concat_mlp"):
        diff = sweep_values("cross_attention", steps) - sweep_values(base, steps)
        print(f"  {steps} steps, vs {names[base]:10s}: {np.round(diff, 3).tolist()}")
bind = {v: sweep_values(v, 600, "binding/swap_attribute") for v in ABLATION}
print("binding on swapped attributes at 600 steps, per seed:", {names[v]: np.round(b, 3).tolist() for v, b in bind.items()})
# the claims of the next paragraph, checked on the stored sweep
assert (sweep_values("cross_attention", 300) > sweep_values("concat", 300)).all()
assert (sweep_values("cross_attention", 600) > sweep_values("concat", 600)).all()
assert abs(sweep_values("cross_attention", 600).mean() - sweep_values("concat_mlp", 600).mean()) < 0.01
assert (bind["cross_attention"] > bind["concat_mlp"]).all() and (bind["cross_attention"] > bind["concat"]).all()

# %% [markdown]
# Three things stand out. **Against the plain baseline, cross-attention is ahead with every seed**: by 0.04 to
# 0.15 at 300 steps, and by 0.03 to 0.07 at 600, while both keep improving. **Against a baseline of its own size,
# the accuracy lead goes away with training**: at 300 steps the wide `concat_mlp` is still behind with every seed
# (once by only 0.002), but at 600 steps its mean is within 0.01 of cross-attention's, and it is ahead in two seeds of three. So
# most of what looked like the advantage of the mechanism was the advantage of more parameters after the fusion.
# **What capacity does not buy is binding**: on swapped attributes, cross-attention prefers the true caption
# about 0.60 of the time, against 0.54 for `concat_mlp` and 0.52 for `concat`, ahead of both with every seed,
# though far from solved; on swapped relations all three stay near chance. And `comp` follows test closely for
# every model at both lengths. The chapter trains the three models for 600 steps, about three minutes on 2
# cores.

# %%
STEPS = 600  # optimizer steps for every model (64 images = 128 pairs a step), the same seed for all


def train(variant: str, steps: int = STEPS, seed: int = 0, log_every: int = 0, split=None):
    """The sweep's recipe on `split` (default: the tiny training split); returns (model, History)."""
    return train_recipe(variant, world["train"] if split is None else split, tokenizer, steps, run_seed(seed),
                        log_every=log_every)


# %%
# NBVAL_IGNORE_OUTPUT
# training log (timings vary by machine); the results are printed in the cells after the next
trained = {"cross_attention": train("cross_attention", log_every=150)}
print(f"cross-attention: {STEPS} steps in {trained['cross_attention'][1].seconds:.0f} s")

# %%
# NBVAL_IGNORE_OUTPUT
# the ablations: the same encoders, seed and steps, with the pooled features concatenated instead of cross-attended
for v in ("concat", "concat_mlp"):
    trained[v] = train(v, log_every=300)
    print(f"{names[v]}: {STEPS} steps in {trained[v][1].seconds:.0f} s")

# %%
# NBVAL_IGNORE_OUTPUT
fig, ax = plt.subplots(figsize=(6, 3))
for f in trained:  # moving average over 50 steps, plotted at the window's last step
    ax.plot(np.arange(50, STEPS + 1), np.convolve(trained[f][1].losses, np.ones(50) / 50, mode="valid"),
            label=names[f])
ax.set(xlabel="step", ylabel="matching loss", title="training loss (moving average of 50 steps)")
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %%
# NBVAL_IGNORE_OUTPUT
results = {(f, s): evaluate_matching(trained[f][0], world[s], tokenizer) for f in trained for s in ("test", "comp")}
rows = [("match accuracy (balanced)", "accuracy"), ("  true pairs accepted", "positive"),
        ("  easy negatives rejected", "easy"), ("hard negatives rejected", "hard"),
        *((f"  {k}", f"hard/{k}") for k in NEGATIVE_KINDS),
        *((f"binding: {k}", f"binding/{k}") for k in NEGATIVE_KINDS)]
cols = [(f, s) for s in ("test", "comp") for f in trained]
print(f"{'':28s}" + "".join(f"{names[f] + ' ' + s:>17s}" for f, s in cols))
for label, key in rows:
    print(f"{label:28s}" + "".join(f"{results[c][key]:17.3f}" for c in cols))
print("final training loss (mean of the last 50 steps):",
      ", ".join(f"{names[f]} {np.mean(trained[f][1].losses[-50:]):.3f}" for f in trained))
for f in trained:  # bounds below the sweep's 600-step seeds (accuracy 0.83-0.93, easy 0.76-0.91, positive 0.91-0.98)
    test_r, comp_r = results[(f, "test")], results[(f, "comp")]
    assert test_r["accuracy"] > 0.8 and test_r["easy"] > 0.65 and test_r["positive"] > 0.85, (f, test_r)
    assert test_r["hard"] < test_r["easy"], f  # hard negatives are harder than other images' captions
    # far from solved: the sweep's 600-step seeds give 0.50-0.65 for the three models (chance is 0.5)
    assert 0.4 < test_r["binding/swap_attribute"] < 0.8, f
    assert abs(comp_r["accuracy"] - test_r["accuracy"]) < 0.07, f  # held-out pairs cost little

# %% [markdown]
# What the table says, read row by row (`accuracy` balances true pairs against captions of other images;
# `hard` rows are rejection rates of the hard negatives at the 0.5 threshold; `binding` rows are threshold-free:
# how often the true caption a hard negative was edited from gets a higher match probability than the negative,
# 0.5 being chance). This is one seed on one machine; the sweep above is what the claims rest on, and the cell's
# asserts hold for every seed we ran.
#
# * **All three models learn to match on images like the training ones**, accepting nearly every true caption and
#   rejecting most captions of other images (accuracy about 0.83 to 0.93 over the sweep's seeds).
# * **Hard negatives are hard for all of them.** At the threshold, only about six in ten hard negatives are
#   rejected: "a small yellow diamond and a large red diamond" has exactly the words of the true caption "a small
#   red diamond and a large yellow diamond", and a model that scores the bag of words cannot tell them apart. The
#   binding rows say the same without a threshold: on swapped attributes and relations, the true caption beats its
#   twin little more often than a coin would; a changed colour, a changed word, is caught about three times in
#   four. The concatenation baselines are not blind to order (their GRU state reads the words in sequence), but
#   pooling leaves them little to bind with.
# * **On `comp`, every model does almost as well as on test**, although every `comp` image holds a colour-shape
#   pair that no training image holds. The next cell splits the true `comp` captions by whether they name such a
#   pair.

# %%
held_out = [f"{c} {s}" for c, s in HELD_OUT_PAIRS]
names_pair = lambda text: any(p in text for p in held_out)  # noqa: E731
train_neg = [c for negs in world["train"].negatives for c, _ in negs]
train_q = [q for qs in world["train"].questions for q, _, _ in qs]
print(f"training texts naming a held-out pair: captions {sum(map(names_pair, sum(world['train'].captions, [])))}, "
      f"hard negatives {sum(map(names_pair, train_neg))}, questions {sum(map(names_pair, train_q))}")
comp = world["comp"]
texts_c = [c for caps in comp.captions for c in caps]  # every true caption of every comp image
owner_c = np.repeat(np.arange(len(comp)), [len(caps) for caps in comp.captions])
has_pair = np.array([names_pair(t) for t in texts_c])


def comp_acceptance(net: MatchingModel) -> tuple[float, float]:
    """Share of the true comp captions accepted (P(match) > 0.5): (those naming a held-out pair, the others)."""
    p_match = score_pairs(net, comp, owner_c, texts_c, tokenizer, batch_size=500).numpy()
    return float((p_match[has_pair] > 0.5).mean()), float((p_match[~has_pair] > 0.5).mean())


print(f"{has_pair.sum()} of the {len(texts_c)} true comp captions name a held-out pair")
assert sum(map(names_pair, train_neg)) == 0 and sum(map(names_pair, train_q)) == 0

# %%
# NBVAL_IGNORE_OUTPUT
print(f"{'true comp captions accepted':30s} {'names a held-out pair':>22s} {'does not':>9s}")
accept = {f: comp_acceptance(net) for f, (net, _) in trained.items()}
for f, (yes, no) in accept.items():
    print(f"{names[f]:30s} {yes:22.3f} {no:9.3f}")
for f, (yes, no) in accept.items():  # novelty costs a few points, no more (bounds from the seed offsets)
    assert yes > 0.65 and no - yes < 0.2, (f, yes, no)

# %% [markdown]
# More than half of the true `comp` captions name a held-out pair ("the red triangle is left of ..."), a
# combination of two words that never occurs together in any training text, for an object the CNN never saw.
# Every model accepts most of them (about 0.8 in our runs), a few points fewer than of the captions that do not
# name one (about 0.87): novelty costs a few points, no more. Each colour and each shape occurs in training with
# five partners, and that is enough for all three models to compose them.
#
# ### A shortcut the data must not offer
#
# That result rests on a property of the data that is easy to break. Every hard negative is false by construction,
# and swapping the colours of "a red circle and a blue triangle" gives "a blue circle and a red triangle": a false
# caption that names two held-out pairs. If such edits reached the training split, every training caption that
# names a held-out pair would be false, and "mentions a red triangle" would be a perfect cue for "no match". The
# empirical risk of 4.1 rewards any feature that works on the training set, so a model would learn that cue, and
# `comp` would measure the cue rather than composition. The generator therefore keeps these edits (and existence
# questions about held-out pairs) out of train, val and test: the counts of 0 above. To see what that filter
# prevents, the next cell makes the training negatives again with the generator's own functions and the filter
# switched off, and trains the same cross-attention model on them, with the same seed and steps.

# %%
# NBVAL_IGNORE_OUTPUT
# training log; the comparison is printed, rounded, in the next cell
margin = PRESETS["tiny"].relation_margin
draw = Draw(np.random.default_rng(0))
leaky_negatives, leaky_sources = [], []
for row in world["train"].objects:  # the generator's own edits, with the held-out filter switched off
    objs = scene_list(row)
    sources = caption_specs(objs, draw, PRESETS["tiny"].n_captions, margin)  # fresh captions to edit
    edits = negative_specs(objs, draw, sources, margin, held_out_ok=True)  # (false spec, kind, source spec)
    leaky_negatives.append([(render(spec), kind) for spec, kind, _ in edits])
    leaky_sources.append([render(source) for _, _, source in edits])
leaky = dataclasses.replace(world["train"], negatives=leaky_negatives, negative_sources=leaky_sources)
leaky_model, leaky_history = train("cross_attention", split=leaky, log_every=300)
print(f"cross-attention on leaky negatives: {STEPS} steps in {leaky_history.seconds:.0f} s")

# %%
n_leaky = sum(names_pair(c) for negs in leaky_negatives for c, _ in negs)
print(f"leaky training negatives naming a held-out pair: {n_leaky} of {sum(map(len, leaky_negatives))}")
assert n_leaky > 0.1 * sum(map(len, leaky_negatives))

# %%
# NBVAL_IGNORE_OUTPUT
accept["leaky"] = comp_acceptance(leaky_model)
leaky_test = evaluate_matching(leaky_model, world["test"], tokenizer)["accuracy"]
leaky_comp = evaluate_matching(leaky_model, world["comp"], tokenizer)
print(f"{'cross-attention trained on':30s} {'test accuracy':>14s} {'comp accuracy':>14s} "
      f"{'comp true accepted: names a pair':>33s} {'does not':>9s}")
for label, key, test_acc, comp_acc in (
        ("the generator's negatives", "cross_attention", results[("cross_attention", "test")]["accuracy"],
         results[("cross_attention", "comp")]["accuracy"]),
        ("leaky negatives", "leaky", leaky_test, leaky_comp["accuracy"])):
    print(f"{label:30s} {test_acc:14.3f} {comp_acc:14.3f} {accept[key][0]:33.3f} {accept[key][1]:9.3f}")
# the leak shows on comp and hides on test. Over seed offsets 0 and 7: acceptance of pair-naming captions falls by
# 0.38 and 0.14, comp accuracy by 0.24 and 0.12, test accuracy by 0.03 in both; the bounds keep the direction only
assert abs(leaky_test - results[("cross_attention", "test")]["accuracy"]) < 0.07
assert accept["leaky"][0] < accept["cross_attention"][0] - 0.05 and abs(accept["leaky"][1] - accept["cross_attention"][1]) < 0.1
assert leaky_comp["accuracy"] < results[("cross_attention", "comp")]["accuracy"] - 0.05

# %% [markdown]
# With the filter off, about one training negative in six names a held-out pair, and no true caption does. The
# model trained on them is nearly as good on the test split as the one trained on the generator's negatives (a
# difference of a few points, about the spread between seeds), so nothing in-distribution warns of the problem.
# On `comp` it accepts far fewer of the true captions that name a held-out pair (0.45 and 0.67 in two of our runs,
# against about 0.8 without the leak), while it accepts the others as before: it has learned the cue, and its
# `comp` accuracy falls by 0.1 to 0.25. How much the cue is used varies from seed to seed; that it is used does
# not. A compositional split is only as good as
# the guarantee that nothing in training, negatives included, speaks about the held-out combinations. Real
# benchmarks have the same weakness: SugarCrepe (Hsieh et al., 2023) showed that the hard negatives of earlier
# compositionality benchmarks could often be told from the true captions by their text alone, without the image.

# %% [markdown]
# ### What the words look at
#
# The text-to-image weights of the trained model's fusion layer say, for each word, how its query spreads over
# the 16 image regions. Below, averaged over the 4 heads and overlaid on test images (brighter = more weight),
# for the colour and shape words of each image's first caption, which names every object. Keep in mind that the
# GRU reads left to right: the token at "yellow" carries "a small yellow", the token at "circle" carries
# "a small yellow circle", plus whatever came before.

# %%
test = world["test"]
grid = trained["cross_attention"][0].image_encoder.grid_size(cfg.image_size)  # 4: a 4 x 4 region grid


def text_to_image_weights(net: MatchingModel, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """First captions of test images `indices`: ids (B, T) and the text->image weights per head (B, heads, T, 16)."""
    ids, mask = tokenizer.encode_batch([test.captions[k][0] for k in indices], add_bos_eos=True, strict=True)
    imgs = test.image_tensor(indices)  # (B, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        _, weights = net(imgs, ids, mask, return_weights=True)
    return ids, weights[0][1]  # layer 0's (image->text, text->image) pair: text->image is (B, heads, T, 16)


col, valid = FIELDS.index("color"), FIELDS.index("valid")
n_obj = (test.objects[:, :, valid] == 1).sum(1)
distinct = [k for k in range(len(test)) if n_obj[k] in (2, 3)
            and len(set(test.objects[k, : n_obj[k], col])) == n_obj[k]][:4]  # 2-3 objects, all colours differ
ids_ex, w_ex = text_to_image_weights(trained["cross_attention"][0], distinct)
w_ex = w_ex.mean(1)  # averaged over the heads: (B, T, 16)
fig, axes = plt.subplots(len(distinct), 5, figsize=(8, 1.75 * len(distinct)))
for row, k in enumerate(distinct):
    words = [tokenizer.id_to_token(int(t)) for t in ids_ex[row]]
    axes[row, 0].imshow(test.images[k], interpolation="nearest")
    axes[row, 0].set_title("\n".join(textwrap.wrap(test.captions[k][0], 30)), fontsize=6)
    axes[row, 0].axis("off")
    content = [t for t, wd in enumerate(words) if wd in COLORS or wd in SHAPES][:4]
    for c, t in enumerate(content, start=1):
        mmlite.plot.attention_overlay(axes[row, c], test.images[k], w_ex[row, t], title=f'"{words[t]}"')
    for c in range(len(content) + 1, 5):
        axes[row, c].axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# To go beyond a few pictures, measure it on all 500 test images. For a colour word, the regions that hold
# that colour can be read off the pixels (a region counts when at least 4 of its 64 pixels are within 40 levels
# of the colour's RGB value in every channel, which the jittered object colours satisfy and the grey background
# never does). The attention mass a word puts on those regions is compared with their share of the grid, which
# is what attention that ignores the image would put there; the shape word that follows the colour word
# ("yellow **circle**") names the same object and is scored on the same regions. The untrained model (the same
# initial weights) is the control.

# %%
# NBVAL_IGNORE_OUTPUT
def color_regions(images: np.ndarray, color: int, min_pixels: int = 4) -> np.ndarray:
    """Regions of the grid x grid layout where `color` covers at least min_pixels pixels: (N, 16) bool."""
    close = (np.abs(images.astype(np.int64) - np.array(COLOR_RGB[color])) <= 40).all(-1)  # (N, 32, 32)
    side = images.shape[1] // grid
    counts = close.reshape(len(images), grid, side, grid, side).sum((2, 4))  # (N, 4, 4) pixels per region
    return counts.reshape(len(images), grid * grid) >= min_pixels  # (N, 16), row-major like the CNN's tokens


def localisation(net: MatchingModel) -> dict[str, np.ndarray]:
    """Per word kind: mean attention mass on the named colour's regions for each head and for the head average,
    then the regions' mean share of the grid (what attention blind to the image would put there): (heads + 2,).
    Also "map change": the mean total-variation distance between the maps of a caption's first two colour words."""
    every = list(range(len(test)))
    ids_all, w_all = text_to_image_weights(net, every)  # (N, T), (N, heads, T, 16)
    w_all = torch.cat([w_all, w_all.mean(1, keepdim=True)], 1)  # (N, heads + 1, T, 16): the average last
    regions = {c: torch.from_numpy(color_regions(test.images, c)) for c in range(len(COLORS))}
    rows = {"colour word": [], "shape word": [], "map change": []}
    for k in every:
        words = [tokenizer.id_to_token(int(t)) for t in ids_all[k]]
        colour_pos = [t for t, wd in enumerate(words[:-1]) if wd in COLORS]
        for t in colour_pos:
            cells = regions[COLORS.index(words[t])][k]
            if cells.any():
                for kind, pos in (("colour word", t), ("shape word", t + 1)):  # "yellow", then "circle"
                    mass = w_all[k, :, pos][:, cells].sum(-1)  # (heads + 1,)
                    rows[kind].append(torch.cat([mass, cells.double().mean()[None]]).numpy())
        if len(colour_pos) >= 2:
            tv = 0.5 * (w_all[k, :, colour_pos[0]] - w_all[k, :, colour_pos[1]]).abs().sum(-1)  # (heads + 1,)
            rows["map change"].append(torch.cat([tv, torch.tensor([float("nan")])]).numpy())
    return {kind: np.mean(r, axis=0) for kind, r in rows.items()}


untrained = build_matching("cross_attention", len(tokenizer), seed=run_seed(0))  # the trained model's initial weights
loc = {"trained": localisation(trained["cross_attention"][0]), "untrained": localisation(untrained)}
heads = cfg.n_heads
print(f"{'':28s}" + "".join(f"{'head ' + str(h + 1):>8s}" for h in range(heads)) + f"{'average':>9s}{'share':>7s}")
for model_name, by_kind in loc.items():
    for kind, v in by_kind.items():
        print(f"{model_name + ', ' + kind:28s}" + "".join(f"{x:8.3f}" for x in v[:heads]) + f"{v[heads]:9.3f}"
              + (f"{v[-1]:7.3f}" if kind != "map change" else f"{'-':>7s}"))
colour_row, change_row = loc["trained"]["colour word"], loc["trained"]["map change"]
lift = colour_row[:-1] / colour_row[-1]  # mass on the object / share of the grid, per head and averaged
print("mass on the object / share, per head and averaged:", np.round(lift, 2))
# over seed offsets 0 and 7 (and an earlier run): the head average's lift was 0.96 and 1.24 (0.71); the heads
# spread from 0.4-0.7 to 1.8-2.3. The bounds: maps depend on the word, the average stays near the uniform share,
# and the heads disagree with each other
assert loc["untrained"]["map change"][heads] < 0.01 and change_row[heads] > 0.1
assert lift[heads] < 1.6 and lift[:heads].max() > 1.5 * lift[:heads].min()

_, w_heads = text_to_image_weights(trained["cross_attention"][0], distinct[:1])  # (1, heads, T, 16)
words0 = [tokenizer.id_to_token(int(t)) for t in ids_ex[0]]
fig, axes = plt.subplots(2, heads + 1, figsize=(8, 3.6))
for row, t in enumerate([t for t, wd in enumerate(words0) if wd in COLORS][:2]):  # the caption's first 2 colours
    axes[row, 0].imshow(test.images[distinct[0]], interpolation="nearest")
    axes[row, 0].axis("off")
    for h in range(heads):
        mmlite.plot.attention_overlay(axes[row, h + 1], test.images[distinct[0]], w_heads[0, h, t],
                          title=f'head {h + 1}, "{words0[t]}"')
plt.tight_layout()
plt.show()

# %% [markdown]
# What the maps show, honestly. The trained model's text-to-image attention is far from uniform, and it depends on
# the word: the maps of a caption's two colour words differ clearly (a total-variation distance of about 0.5 per
# head, 0.25-0.4 for the head average; the untrained model's maps are identical, and uniform). But the maps do not
# reliably land on the object the word names. Averaged over the heads, a colour word puts close to the uniform
# share of its weight on that object's regions (0.7 to 1.3 times it over our runs): about what attention blind to
# the image would put there. Some head does look at the named object, with about twice the uniform share (the
# last printed line: object mass divided by the uniform share, per head), while others look away from it, giving
# it about half the uniform share, and so look at the other objects and the background. Which head does which changes from seed to seed;
# that the average does not localise does not. Look at the per-head maps above with that in mind. That is no
# contradiction: nothing in the matching loss asks
# attention to point where a person would. It asks for a pooled image vector that, next to the pooled text,
# predicts match or no match, and the model uses cross-attention as a word-dependent way to pool the image that
# serves that purpose; a head that gathers "everything except the red object" can serve it as well as one that
# gathers the red object. An attention map describes what the layer computed, not why the model decided; averaging
# over heads, as the first figure does, mixes heads that look at the object with heads that look away from it.

# %% [markdown]
# ## 4.4 Common pitfalls
#
# Each of these gives wrong numbers without an error message, which is why every derivation above ended in a
# check.
#
# * **Softmax overflow.** $e^{1000}$ is `inf` in float64 and $\infty/\infty$ is `nan`. Subtracting the row
#   maximum first changes nothing mathematically (the Jacobian's rows sum to zero: a shift of all scores is
#   invisible) and keeps every exponent $\le 0$. `mmlite.numpy_attention.softmax` does it.
# * **Mask polarity.** In this library a mask is True where a token may be attended; `torch.nn.MultiheadAttention`'s
#   `key_padding_mask` is True where a token must be *ignored*. Passing one convention to the other attends to
#   the padding and ignores the words, silently.
# * **Sum versus mean.** A summed loss has a gradient $B$ times larger than the mean; changing the batch size then
#   changes the effective learning rate. The $1/B$ in every gradient above comes from the mean.
# * **Transposed weights.** `nn.Linear` stores $W^\top$ (it computes $xW^\top + b$); copying a $W$ from a formula
#   into it needs a transpose, and with square matrices a missing one still runs.

# %%
with np.errstate(over="ignore", invalid="ignore"):
    naive = np.exp(np.array([1000.0, 1001.0])) / np.exp(np.array([1000.0, 1001.0])).sum()
stable = softmax(np.array([1000.0, 1001.0]))
print("naive softmax:", naive, " stable:", np.round(stable, 3))
assert np.isnan(naive).all() and np.isclose(stable.sum(), 1.0)

torch.manual_seed(0)  # fixed weights: this check does not depend on the training seeds above
attn = CrossAttention(8, n_heads=2)
words = torch.randn(1, 3, 8, generator=gen)
regions_pad = torch.randn(1, 5, 8, generator=gen)
key_mask = torch.tensor([[True, True, True, False, False]])  # the last two keys are padding
changed = regions_pad.clone()
changed[:, 3:] = 100.0  # garbage in the padding
with torch.no_grad():
    right = (attn(words, regions_pad, key_mask) - attn(words, changed, key_mask)).abs().max().item()
    wrong = (attn(words, regions_pad, ~key_mask) - attn(words, changed, ~key_mask)).abs().max().item()
print(f"padding changes the output by {right:.1f} with the right mask and by {wrong:.1f} with the inverted one")
assert right == 0.0 and wrong > 1.0

logits_b = torch.randn(256, 3, generator=gen, dtype=torch.float64, requires_grad=True)
labels_b = torch.randint(0, 3, (256,), generator=gen)
g_mean = torch.autograd.grad(cross_entropy(logits_b, labels_b), logits_b)[0]
g_sum = torch.autograd.grad(cross_entropy(logits_b, labels_b, reduction="sum"), logits_b)[0]
torch.testing.assert_close(g_sum, 256 * g_mean)
print("gradient norm, mean vs sum over a batch of 256:", round(g_mean.norm().item(), 3), round(g_sum.norm().item(), 3))

# %% [markdown]
# ## Summary
#
# * A multimodal model is one function $y = f(x_1, x_2; \theta)$; training minimises the empirical risk, and the
#   only thing gradient descent needs from the model is $\nabla_\theta \hat R$. Whether the minimiser generalises
#   depends on the form of $f$ (4.1: the same loss and optimiser overfit on pixels and generalise on colour
#   histograms).
# * Cross-entropy's gradient is $\mathrm{softmax}(z) - \mathrm{onehot}(y)$, MSE's is $\frac2n(\hat y - y)$; the
#   contrastive loss is two batches of cross-entropies, so its gradient on the logits is
#   $\frac{1}{2B}[(P^\text{row} - I) + (P^\text{col} - I)]$, and the temperature decides how much of the push goes
#   to the hardest negatives.
# * Attention is three maps, each with a one-line backward: $\bar V = A^\top\bar O$, $\bar A = \bar O V^\top$;
#   $\bar S = A \odot (\bar A - \mathrm{rowsum}(\bar A \odot A))$ from the softmax Jacobian
#   $\mathrm{diag}(a) - aa^\top$; $\bar Q = \bar S K/\sqrt{d_k}$, $\bar K = \bar S^\top Q/\sqrt{d_k}$.
#   `mmlite.numpy_attention` implements them and matches autograd to float64 rounding.
# * $\mathrm{Var}(q\cdot k) = d_k$ for independent unit-variance components; without the $1/\sqrt{d_k}$ the
#   softmax saturates as $d_k$ grows and its Jacobian, hence the gradient to $Q$ and $K$, collapses.
# * The seed's matching model is `MatchingModel(cnn, gru, cross_attention)`. On the shapes world it learns to
#   match faster than the concatenation baseline and stays ahead with every seed (0.03 to 0.07 after 600 steps);
#   but a concatenation baseline of the same size catches up in accuracy by 600 steps, so most of that lead is
#   capacity. What capacity does not buy is binding: cross-attention prefers the true caption over its
#   attribute-swapped twin about 0.60 of the time, the baselines 0.52-0.54, none of them reliably. Its attention
#   maps depend on the words without pointing at the objects they name. All models generalise to colour-shape
#   pairs never seen in training, but only because no training text names those pairs: with hard negatives that
#   do, the model learns "names a held-out pair, so no match" and rejects half of the true captions of the
#   compositional split. Every one of these findings is a measurement over seeds (`data/sweeps/matching.json`),
#   with the spread to read it by.
#
# ## Exercises
#
# **1.** Binary matching is often written with one logit $z$ and a sigmoid instead of two logits and a softmax:
# $\ell = -y\log\sigma(z) - (1-y)\log(1-\sigma(z))$. Derive $\partial\ell/\partial z$ and check it against
# `F.binary_cross_entropy_with_logits`.

# %% [markdown]
# *Solution.* $\partial\ell/\partial z = \sigma(z) - y$: the same "prediction minus truth" as the softmax case
# (a 2-class softmax over logits $(0, z)$ *is* a sigmoid).

# %%
zs, ys = sp.symbols("z y", real=True)
sig = 1 / (1 + sp.exp(-zs))
bce = -ys * sp.log(sig) - (1 - ys) * sp.log(1 - sig)
assert sp.simplify(sp.diff(bce, zs) - (sig - ys)) == 0
z_num = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
y_num = (torch.rand(5, generator=gen) < 0.5).double()
F.binary_cross_entropy_with_logits(z_num, y_num, reduction="sum").backward()
torch.testing.assert_close(z_num.grad, torch.sigmoid(z_num.detach()) - y_num, rtol=1e-12, atol=1e-14)
print("d BCE / dz = sigmoid(z) - y")

# %% [markdown]
# **2.** Show that the softmax Jacobian is singular, and that the gradient of cross-entropy with respect to the
# logits always sums to zero. What does that say about adding a constant to every logit?

# %% [markdown]
# *Solution.* $J\mathbf 1 = a - a\,(a^\top \mathbf 1) = a - a = 0$, so $\mathbf 1$ is in the null space and $J$
# has rank at most $n-1$; and $\sum_k (p_k - [k=y]) = 1 - 1 = 0$. Moving every logit by the same constant moves
# along $\mathbf 1$, which changes neither $p$ nor the loss, so the gradient has no component along it.

# %%
s4 = symbolic.vector("s", 4)
J4 = symbolic.softmax(s4).jacobian(s4)
assert symbolic.is_zero(J4 * sp.ones(4, 1))
assert np.linalg.matrix_rank(symbolic.evaluate(J4, {s4: [0.3, -1.0, 2.0, 0.5]})) == 3
assert abs(float(logits.grad.sum())) < 1e-12  # 4.1's cross-entropy gradient, summed over classes and batch
print("J 1 = 0, rank(J) = n - 1, and the CE gradient sums to zero")

# %% [markdown]
# **3.** `mmlite.numpy_attention` has no biases. Get the gradient of a query bias ($Q = X_1 W^Q + \mathbf 1 b^\top$)
# from it anyway, and check it against autograd through an `nn.Linear` with a bias.

# %% [markdown]
# *Solution.* Append a column of ones to $X_1$ and the bias as the last row of $W^Q$: $[X_1, \mathbf 1]
# \begin{bmatrix}W^Q\\ b^\top\end{bmatrix} = X_1W^Q + \mathbf 1 b^\top$. The last row of $\bar W^Q$ is then
# $\mathbf 1^\top \bar Q = \bar b$, the column sums of $\bar Q$.

# %%
rng = np.random.default_rng(5)
x1b, x2b = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 7, 6))
lin_q = torch.nn.Linear(6, 4).double()
wk_b, wv_b = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
wq_aug = np.vstack([lin_q.weight.detach().numpy().T, lin_q.bias.detach().numpy()[None]])  # (7, 4)
x1_aug = np.concatenate([x1b, np.ones((2, 4, 1))], -1)  # (2, 4, 7)
out_b, cache_b = cross_attention_forward(x1_aug, x2b, wq_aug, wk_b, wv_b)
g_b = rng.standard_normal(out_b.shape)
bias_grad = cross_attention_backward(g_b, cache_b).w_q[-1]
kt, vt = torch.from_numpy(x2b @ wk_b), torch.from_numpy(x2b @ wv_b)
out_ref, _ = scaled_dot_product_attention(lin_q(torch.from_numpy(x1b)), kt, vt)
(out_ref * torch.from_numpy(g_b)).sum().backward()
np.testing.assert_allclose(bias_grad, lin_q.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
print("query-bias gradient from the ones-column trick == autograd")

# %% [markdown]
# **4.** Redo the $\sqrt{d_k}$ argument when the components are not centred: query components with mean
# $\mu_q$ and standard deviation $\sigma_q$, key components with $\mu_k$ and $\sigma_k$ (still independent).
# What is $\mathrm{Var}(q\cdot k/\sqrt{d_k})$, and what does it suggest about the LayerNorm before attention?

# %% [markdown]
# *Solution.* One term now has $\mathrm{Var}(q_ik_i) = \mathbb{E}[q_i^2]\mathbb{E}[k_i^2] - \mu_q^2\mu_k^2 =
# \sigma_q^2\sigma_k^2 + \mu_q^2\sigma_k^2 + \mu_k^2\sigma_q^2$, and different terms are still uncorrelated,
# so that is also $\mathrm{Var}(q\cdot k/\sqrt{d_k})$: the scale removes the dependence on the width, not on the
# size or the offset of the projections. A mean of 2 in the queries quadruples the key variance's share of the
# score variance; normalising the features before attention (centring them, unit variance) keeps the scores at
# unit scale.

# %%
m_q, m_k = sp.symbols("mu_q mu_k", real=True)
q_off, k_off = normal_vectors(2, m_q, m_k)
var_off = sp.simplify(variance(q_off[0] * k_off[0]))
assert sp.simplify(covariance(q_off[0] * k_off[0], q_off[1] * k_off[1])) == 0  # terms still uncorrelated
var_general = sp.summation(var_off, (i, 1, d_k)) / d_k
assert sp.simplify(var_general - (s_q**2 * s_k**2 + m_q**2 * s_k**2 + m_k**2 * s_q**2)) == 0
show(r"\mathrm{Var}\big(q\cdot k/\sqrt{d_k}\big)", sp.simplify(var_general))
rng = np.random.default_rng(6)
q_sim, k_sim = 2.0 + 1.0 * rng.standard_normal((4000, 64)), 0.5 * rng.standard_normal((4000, 64))
sim_var = ((q_sim * k_sim).sum(-1) / 8).var()
theory = float(var_general.subs({s_q: 1.0, s_k: 0.5, m_q: 2.0, m_k: 0.0}))
assert abs(sim_var - theory) < 0.1 * theory, (sim_var, theory)  # standard error of a variance from 4000 draws ~2 %
print(f"simulated with mu_q = 2, sigma_q = 1, mu_k = 0, sigma_k = 0.5: {sim_var:.2f} (theory {theory:.2f})")
