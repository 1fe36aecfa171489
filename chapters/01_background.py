# %% [markdown]
# # Chapter 1: Background — why images and text together
#
# **Seed section:** 1 (背景介绍: 1.1 问题由来, 1.2 研究现状, 1.3 研究意义, 1.4 本文结构), the background:
# the origin of the problem, the state of research, why it matters, and the structure of what follows.
#
# **Goals:**
# - say what a *modality* is and measure, exactly, why combining two of them helps: on the book's data,
#   a predictor that sees only the question or only the image is far from one that sees both;
# - read the notation $y = f(x_1, \dots, x_n; \theta)$ that the rest of the book uses;
# - place the main families of image-text models (dual encoders, fusion encoders, generative models) and
#   the ideas each brought;
# - take a full tour of the book's *shapes world* (images, captions, questions, hard negatives, the
#   compositional split, the tokenizer and the batches every later chapter trains on);
# - see the book's roadmap, section by section.
#
# **Prerequisites:** Python and NumPy; a first look at PyTorch tensors helps. No machine learning is assumed yet.
#
# **Run time:** under 1 min on 2 CPU cores (about 6 s measured on 2 idle cores; no training in this chapter).

# %%
import mmlite.utils

device = mmlite.utils.setup(seed=0, threads=2)

import os
import platform
from collections import Counter, defaultdict

import matplotlib.pyplot as plt
import numpy as np
import torch

import mmlite.plot
from mmlite.data import (ANSWERS, COLOR_RGB, COLORS, HELD_OUT_PAIRS, NEGATIVE_KINDS, NUMBERS, PRESETS,
                         QUESTION_TYPES, SHAPES, SIZES, SPLITS, build_tokenizer, caption_truth, describe, load,
                         make_loader, render_scenes)
from mmlite.data.semantics import count, relation, scene_list
from mmlite.data.world import SHAPE_PLURALS

# %% [markdown]
# The cell below records the machine the chapter ran on. Its output differs from machine to machine, so it
# is not compared when the book is tested; everything after it is. `setup()` fixed PyTorch's thread count to
# 2 whatever `OMP_NUM_THREADS` says, so every printed number is the same on any machine.

# %%
# NBVAL_IGNORE_OUTPUT
print("python", platform.python_version(), "| torch", torch.__version__, "| numpy", np.__version__)
print("best available device:", mmlite.utils.get_device(), "| chapter runs on:", device)
print("torch threads:", torch.get_num_threads(), "| CPU cores:", os.cpu_count())

# %% [markdown]
# ## 1.1 The origin of the problem
#
# A **modality** is a kind of signal with its own structure: an image is a grid of pixels, where
# neighbouring values belong together; a sentence is a sequence of discrete words, where order carries
# meaning; audio is a waveform in time. Each has its own natural encoder (convolutions or patches for
# images, sequence models for text), and each captures only part of a situation. People combine them
# without effort: we answer a question about a photo by reading the question *and* looking.
#
# That is where the problem comes from (the seed's 1.1, *the origin of the problem*): a single-modality model
# sees half of the evidence, and many tasks are ambiguous from either half alone. Rather than assert it, we
# measure it. The book's data world
# (toured in full in section 1.5) holds small rendered scenes, each with six questions. Here is one image
# and some of its questions, next to a second image that is asked the same question.

# %%
world = load("tiny", seed=0)  # generated under data/cache/ on first use (about 2 s), then read from disk
train, test = world["train"], world["test"]
print({name: len(split) for name, split in world.items()})

# Find two test images asked the same colour question with different answers.
asked = defaultdict(list)  # question text -> [(image index, answer)]
for i, qs in enumerate(test.questions):
    for q, a, _ in qs:
        asked[q].append((i, a))
question = "what color is the circle ?"
(i1, a1), (i2, a2) = asked[question][0], next(p for p in asked[question] if p[1] != asked[question][0][1])
other = next((q, a) for q, a, _ in test.questions[i1] if a != a1)  # a second question of image i1
for i in (i1, i2):
    print(f"test image {i}: {test.scene(i)}")
print(f"image {i1}: {question!r} -> {a1!r};  {other[0]!r} -> {other[1]!r}")
print(f"image {i2}: {question!r} -> {a2!r}")

fig = mmlite.plot.image_grid(
    [test.images[i1], test.images[i2]],
    [f"{question} {a1} | {other[0]} {other[1]}", f"{question} {a2}"], ncols=2, size=2.6, fontsize=7, wrap=34)
plt.show()

# %% [markdown]
# The same image gets different answers to different questions, so **the image alone does not determine the
# answer**; the same question gets different answers on different images, so **the text alone does not
# either**. The pair does.
#
# How much does each half give? We can compute it exactly, with no training:
#
# - **text only**: a predictor that sees the question string but not the image. The natural rule learned
#   from data answers each question string with its most frequent answer in `train` (a question never seen in
#   train gets its question type's most frequent answer). We also compute an *upper bound* that no text-only
#   rule can beat on this test set: the most frequent answer per question string *on test itself*.
# - **image only**: a predictor that sees the image but not the question must give one answer per image.
#   Whatever it says, it can at best match the most frequent answer among that image's six questions, so the
#   share of those answers is an exact upper bound for *every* image-only predictor (the bound itself peeks at
#   the test answers). The constant answer prior (the most frequent answer in train) is the simplest such predictor.
# - **both**: a predictor that reads the question and looks at the scene. The short program below parses the
#   question grammar and reads the answer off the scene's objects (which stand in for a perfect view of the
#   image). It has no parameters and learns nothing.

# %%
REL_WORDS = {"left of": 0, "to the left of": 0, "right of": 1, "to the right of": 1, "above": 2, "below": 3,
             "under": 3}  # relation phrase -> index into RELATIONS


def noun_phrase(words: list[str]) -> tuple:
    """[size] [colour] noun -> filter (shape, colour, size), None meaning any value."""
    *mods, noun = words
    size = next((SIZES.index(w) for w in mods if w in SIZES), None)
    color = next((COLORS.index(w) for w in mods if w in COLORS), None)
    shape = (SHAPES.index(noun) if noun in SHAPES else SHAPE_PLURALS.index(noun) if noun in SHAPE_PLURALS
             else None)  # "object(s)" and "shape(s)" name any shape
    return shape, color, size


def split_relation(words: list[str]) -> tuple[list[str], int, list[str]]:
    """A REL B -> (A, relation index, B), taking the longest relation phrase."""
    for k in range(len(words)):
        for n in (4, 2, 1):
            phrase = " ".join(words[k:k + n])
            if phrase in REL_WORDS:
                return words[:k], REL_WORDS[phrase], words[k + n:]
    raise ValueError(f"no relation in {' '.join(words)!r}")


def the(objs: list[tuple], f: tuple) -> tuple:
    """The one object that matches filter f ("the X" is always unique in this world)."""
    (o,) = [o for o in objs if count([o], f)]
    return o


def answer(question: str, objs: list[tuple], margin: int = 15) -> str:
    """Answer a question of the shapes-world grammar by reading the scene's objects."""
    w = question.split()[:-1]  # drop the "?"
    if w[:2] == ["how", "many"]:  # how many NP are there / are in the image
        return NUMBERS[count(objs, noun_phrase(w[2:w.index("are")]))]
    if w[0] == "what" and w[3] == "the":  # what color / shape / size is the REF
        o = the(objs, noun_phrase(w[4:]))
        return {"color": COLORS[o[1]], "shape": SHAPES[o[0]], "size": SIZES[o[2]]}[w[1]]
    if w[0] == "what":  # what shape is REL the B
        _, r, b = split_relation(w[3:])
        ob = the(objs, noun_phrase(b[1:]))
        (oa,) = [o for o in objs if o != ob and relation(o, ob, r, margin)]
        return SHAPES[oa[0]]
    if w[-3:] == ["in", "the", "image"]:
        w = w[:-3]
    if w[:2] == ["is", "the"]:  # is the A REL the B
        a, r, b = split_relation(w[2:])
        return "yes" if relation(the(objs, noun_phrase(a)), the(objs, noun_phrase(b[1:])), r, margin) else "no"
    body = w[3:]  # is there a|an NP [REL the B]
    if any(x in body for x in ("left", "right", "above", "below", "under")):
        a, r, b = split_relation(body)
        ob, fa = the(objs, noun_phrase(b[1:])), noun_phrase(a)
        return "yes" if any(relation(o, ob, r, margin) for o in objs if o != ob and count([o], fa)) else "no"
    return "yes" if count(objs, noun_phrase(body)) else "no"


print(answer(question, scene_list(test.objects[i1])), answer(question, scene_list(test.objects[i2])))

# %% [markdown]
# Now the three predictors on all 3,000 test questions. Ties between answers are broken by the fixed order of
# `ANSWERS`, so every number is deterministic.

# %%
def most_frequent(counter: Counter) -> str:
    """The most frequent answer; ties go to the earlier entry of ANSWERS."""
    return max(ANSWERS, key=lambda a: (counter[a], -ANSWERS.index(a)))


by_question, by_type = defaultdict(Counter), defaultdict(Counter)  # train answer counts
for qs in train.questions:
    for q, a, t in qs:
        by_question[q][a] += 1
        by_type[t][a] += 1
prior = most_frequent(sum(by_type.values(), Counter()))

rows = [(q, a, t, i) for i, qs in enumerate(test.questions) for q, a, t in qs]
n = len(rows)
text_pred = [most_frequent(by_question[q]) if q in by_question else most_frequent(by_type[t]) for q, a, t, i in rows]
text_only = np.mean([p == a for p, (q, a, t, i) in zip(text_pred, rows)])
on_test = defaultdict(Counter)
for q, a, t, i in rows:
    on_test[q][a] += 1
text_bound = sum(max(c.values()) for c in on_test.values()) / n
image_bound = sum(max(Counter(a for _, a, _ in qs).values()) for qs in test.questions) / n
prior_acc = np.mean([a == prior for q, a, t, i in rows])
both = np.mean([answer(q, scene_list(test.objects[i])) == a for q, a, t, i in rows])

print(f"test questions: {n}; distinct question strings: {len(on_test)}; "
      f"seen in train: {np.mean([q in by_question for q, *_ in rows]):.3f}")
print(f"{'predictor':58s} accuracy")
for name, acc in [(f"answer prior (always {prior!r})", prior_acc),
                  ("image only, upper bound (best single answer per image)", image_bound),
                  ("text only (most frequent train answer per question)", text_only),
                  ("text only, upper bound (most frequent test answer per q.)", text_bound),
                  ("image + text (read the question, look at the scene)", both)]:
    print(f"{name:58s} {acc:.3f}")
assert prior_acc <= image_bound < text_only <= text_bound < both == 1.0

# %% [markdown]
# Read the table from the bottom. With both modalities the answer is fully determined: the parameter-free
# reader scores 1.000. With the question alone, the majority rule learned from train scores 0.39, and even
# with the test answers in hand no text-only rule passes 0.58 (that bound is loose: most test questions occur
# only once, and a single occurrence is "predicted" perfectly by peeking). With the image alone, **no**
# predictor at all can pass 0.255, because one image's six questions have mostly different answers.
#
# The text-only rule is far above the single answer prior (always "no") because a question's *type* narrows
# the answer set: "what color" admits six answers, "is there" two. How much does it get beyond that? The fair
# chance level of a question type is not 1/#answers: relation questions can be answered with eight words, but
# most of them are yes/no questions, and count questions with five, but half of their answers are "one". The
# table below gives, per type, the share of yes/no answers and the accuracy of always giving the type's most
# frequent train answer (the *majority answer*), which is that chance level.

# %%
n_answers = {t: len({a for qs in train.questions for _, a, tt in qs if tt == t}) for t in QUESTION_TYPES}
majority = {t: most_frequent(by_type[t]) for t in QUESTION_TYPES}  # each type's most frequent train answer
majority_pred = [majority[t] for q, a, t, i in rows]
print(f"{'type':9s} {'questions':>9s} {'answers':>7s} {'yes/no':>6s} {'text only':>9s}   majority answer (train)")
for t in [*QUESTION_TYPES, "all"]:
    sel = [k for k, (q, a, tt, i) in enumerate(rows) if t in (tt, "all")]
    acc = np.mean([text_pred[k] == rows[k][1] for k in sel])
    maj = np.mean([majority_pred[k] == rows[k][1] for k in sel])
    yes_no = np.mean([rows[k][1] in ("yes", "no") for k in sel])
    answers = n_answers[t] if t != "all" else len(ANSWERS)
    print(f"{t:9s} {len(sel):9d} {answers:7d} {yes_no:6.2f} {acc:9.3f}   {maj:.3f} ({majority.get(t, 'per type')!r})")
type_only = np.mean([p == a for p, (q, a, t, i) in zip(majority_pred, rows)])
assert prior_acc < type_only < text_only and text_only - type_only < 0.02

# %% [markdown]
# Against the real chance level the text-only rule gains almost nothing: 0.387 overall against 0.380 for the
# majority answer of each type, the largest gains on relation (0.462 against 0.440) and exist questions (0.514
# against 0.500). Relation questions, with eight possible answers, are 88% yes/no, so their chance level is
# 0.440, not 1/8; count questions are at 0.488 because "one" answers half of them. In this world the question's
# wording, beyond its type, says next to nothing about the answer, by design: the generator balances yes and no
# answers (1.5 shows the statistics). Real VQA data is not, and there the question alone gave many answers
# away, which is why VQA was rebalanced so that the image matters (Goyal et al., 2017, VQA v2).

# %% [markdown]
# Image-text **matching** shows the same thing from the other side. Each image comes with hard-negative
# captions; a `swap_attribute` negative uses *the same words* as a true caption in a different binding. For
# those, any model that reads text as a bag of words gives the positive and the negative the same score, and
# any image-only model sees the same image: both are at chance (0.5) when asked which caption is the true one.
# Checking the caption against the scene (`caption_truth` parses the caption and evaluates its claims on the
# objects) settles every case.

# %%
same_words = []  # (image, true caption, negative) with identical bags of words
for i, (caps, negs) in enumerate(zip(test.captions, test.negatives)):
    bags = {tuple(sorted(c.split())): c for c in caps}
    same_words += [(i, bags[tuple(sorted(neg.split()))], neg) for neg, kind in negs
                   if kind == "swap_attribute" and tuple(sorted(neg.split())) in bags]
i, pos, neg = match_example = same_words[0]
print(f"image {i}: {test.scene(i)}")
print(f"  true:     {pos!r:52} caption_truth = {caption_truth(pos, test.objects[i])}")
print(f"  negative: {neg!r:52} caption_truth = {caption_truth(neg, test.objects[i])}")
print("same multiset of words:", sorted(pos.split()) == sorted(neg.split()))

n_swap = sum(kind == "swap_attribute" for negs in test.negatives for _, kind in negs)
pos_ok = np.mean([caption_truth(c, test.objects[i]) is True for i, cs in enumerate(test.captions) for c in cs])
neg_ok = np.mean([caption_truth(c, test.objects[i]) is False for i, ns in enumerate(test.negatives) for c, _ in ns])
print(f"swap_attribute negatives in test: {n_swap}, of which {len(same_words)} reuse a true caption's exact words")
print(f"image + text (caption_truth): true captions judged true {pos_ok:.3f}, negatives judged false {neg_ok:.3f}")
assert pos_ok == neg_ok == 1.0 and len(same_words) > 0

fig = mmlite.plot.image_grid([test.images[i]], [f"true: {pos} | false: {neg}"], ncols=1, size=2.8, fontsize=7,
                             wrap=46)
plt.show()

# %% [markdown]
# ### Writing the problem down
#
# The whole book uses one notation. A multimodal model is a function
#
# $$y = f(x_1, x_2, \dots, x_n;\ \theta),$$
#
# where $x_1, \dots, x_n$ are the inputs in their $n$ modalities, $\theta$ are the parameters (every weight of
# the encoders, the fusion and the output head) and $y$ is the output. In this book $n = 2$:
#
# | task | $x_1$ | $x_2$ | $y$ | chapters |
# |---|---|---|---|---|
# | retrieval (contrastive) | image (3, 32, 32) | caption, token ids (T,) | similarity score $s \in \mathbb{R}$ | 2, 3, 6 |
# | image-text matching | image | caption or hard negative | $P(\text{match})$ | 2, 3, 4 |
# | visual question answering | image | question | distribution over the 21 `ANSWERS` | 6 |
# | captioning | image | caption prefix | distribution over the next word | 2, 6 |
#
# The `answer` reader above is an $f$ with no $\theta$: a program written by hand, with the grammar's rules
# built in. Real images and real language have no such grammar, so the models of this book must *learn*
# $\theta$ from examples: chapter 4 writes that as $\theta^* = \arg\min_\theta L(f(x_1, x_2; \theta), y^*)$
# with a loss $L$ measuring how far the output is from the target $y^*$.

# %% [markdown]
# ## 1.2 The state of research
#
# The seed article's 1.2 names the models it has in mind: "微软、谷歌、OpenAI等科技巨头纷纷推出自己的多模态大模型,
# 如Turing-NLG、DALL-E、GPT-3等。学术界也提出了一系列多模态预训练模型,如ViLBERT、VisualBERT、UNITER等。" (Microsoft,
# Google, OpenAI and other technology giants have released their own multimodal large models, such as Turing-NLG,
# DALL-E and GPT-3; academia has proposed a series of multimodal pre-trained models, such as ViLBERT, VisualBERT
# and UNITER.) One correction: **Turing-NLG and GPT-3 are not multimodal.** Turing-NLG (Microsoft, 2020, 17
# billion parameters) and GPT-3 (Brown et al., 2020, 175 billion) are text-only language models: they read and
# write text and never see an image. They belong in this story only as the kind of large language model that
# later generative image-text models connect a vision encoder to (Flamingo and LLaVA, below). DALL-E (Ramesh et
# al., 2021) is multimodal: it generates an image from a text, with one transformer over the text's tokens
# followed by discrete image tokens. This book is about models that relate images and texts (match, retrieve,
# answer, describe), so it builds no text-to-image generator. ViLBERT, VisualBERT and UNITER are the fusion
# encoders of the list below.
#
# A short map of the field, by the idea each family brought (years are those of the papers):
#
# - **Task-specific models (2015-2018).** Captioning with a CNN encoder and an RNN decoder (Show and Tell, Vinyals
#   et al., 2015), then attention over image regions (Show, Attend and Tell, Xu et al., 2015; bottom-up and
#   top-down attention, Anderson et al., 2018). VQA became a benchmark (Antol et al., 2015) and was rebalanced,
#   with pairs of similar images that give the same question different answers, once models were found to answer
#   many questions from the question alone (VQA v2, Goyal et al., 2017) — the effect measured in 1.1.
# - **Fusion encoders (2019-2021).** Pre-train one model on image-text pairs, then fine-tune it per task.
#   *ViLBERT* (Lu et al., 2019) keeps two transformer streams, one for image regions and one for words, and joins
#   them with co-attention layers in which each stream's queries attend to the other's keys and values. *LXMERT*
#   (Tan and Bansal, 2019) runs an object encoder and a language encoder side by side and joins them in a
#   cross-modality encoder, pre-trained with masked language modelling, masked object prediction, image-text
#   matching and question answering. *VisualBERT* (Li et al., 2019) is the simplest *single-stream* design: one
#   BERT-style transformer reads the caption's words and the image's region features as a single sequence, so
#   the self-attention of every layer mixes the two, pre-trained with masked language modelling given the image
#   and with deciding whether a caption matches the image. *UNITER* (Chen et al., 2020) is single-stream too and
#   pre-trains with four objectives: masked language modelling, masked region modelling (each masking one
#   modality while the other stays whole), image-text matching, and word-region alignment by optimal transport
#   between the words and the regions. *ALBEF* (Li et al., 2021) **aligns before it fuses**: a contrastive loss
#   first pulls each image and its caption together in a shared space, then a cross-attention fusion encoder is
#   trained on image-text matching with hard negatives picked by that contrastive similarity (plus momentum
#   distillation against noisy web captions).
# - **Dual encoders (2021).** *CLIP* (Radford et al., 2021) trains an image encoder and a text encoder with a
#   symmetric contrastive loss on 400 million web image-text pairs, and classifies images zero-shot by comparing
#   them with prompts such as "a photo of a {label}". *ALIGN* (Jia et al., 2021) shows that the same recipe scales
#   to over a billion noisy alt-text pairs with only simple filtering. One vector per image and per text makes
#   retrieval a nearest-neighbour search, but the single vectors bind attributes poorly: benchmarks of word-order
#   and binding such as Winoground (Thrush et al., 2022) and ARO (Yuksekgonul et al., 2023, "when and why
#   vision-language models behave like bags-of-words") found such models often close to chance. The book's
#   `swap_attribute` negatives test exactly that.
# - **Generative models (2022-).** *BLIP* (Li et al., 2022) trains one model that serves as a unimodal encoder, an
#   image-grounded text encoder and an image-grounded text decoder, with contrastive, matching and captioning
#   losses, and cleans its web data by bootstrapping (CapFilt: a captioner writes synthetic captions, a filter
#   drops noisy ones). *Flamingo* (Alayrac et al., 2022) keeps a pre-trained vision encoder and a pre-trained
#   language model frozen and joins them with a Perceiver Resampler and new gated cross-attention layers whose
#   tanh gates start at zero, so training starts from the unchanged language model; it learns new tasks from a few
#   interleaved image-text examples in its prompt. *LLaVA* (Liu et al., 2023) maps a CLIP vision encoder's patch
#   features with a trained projection into a large language model's token-embedding space and fine-tunes on
#   instruction-following conversations that a text-only GPT-4 generated from captions and boxes ("visual
#   instruction tuning").
#
# The three families differ in *where the modalities meet*, drawn below; each box names the `mmlite` piece
# that implements it in miniature.

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
families = {
    "dual encoder (CLIP, ALIGN)": [("image encoder\nencoders.CNNEncoder", (1.3, 1)),
                                   ("text encoder\nencoders.GRUTextEncoder", (3.7, 1)),
                                   ("project + normalise\nalignment", (2.5, 2.4)),
                                   ("cosine similarity, contrastive\nobjectives.contrastive_loss", (2.5, 3.8))],
    "fusion encoder (ViLBERT, UNITER, ALBEF)": [("image encoder", (1.3, 1)), ("text encoder", (3.7, 1)),
                                                ("cross-attention\nfusion.CrossAttentionFusion", (2.5, 2.4)),
                                                ("match? answer?\nobjectives.itm_loss", (2.5, 3.8))],
    "generative (BLIP, Flamingo, LLaVA)": [("image encoder", (1.3, 1)), ("caption so far", (3.7, 1)),
                                           ("decoder attends to image\nblocks.DecoderBlock", (2.5, 2.4)),
                                           ("next word\nobjectives.caption_loss", (2.5, 3.8))],
}
colors = ["#cfe3f7", "#f7e0c4", "#d9ecd0", "#eeeeee"]
for ax, (title, boxes) in zip(axes, families.items()):
    for (text, xy), c in zip(boxes, colors):
        mmlite.plot.box(ax, xy, text, w=2.2, color=c)
    (_, p1), (_, p2), (_, p3), (_, p4) = boxes
    mmlite.plot.arrow(ax, (p1[0], p1[1] + 0.38), (p3[0] - 0.5, p3[1] - 0.38))
    mmlite.plot.arrow(ax, (p2[0], p2[1] + 0.38), (p3[0] + 0.5, p3[1] - 0.38))
    mmlite.plot.arrow(ax, (p3[0], p3[1] + 0.38), (p4[0], p4[1] - 0.38))
    ax.set_xlim(0, 5), ax.set_ylim(0.4, 4.4), ax.axis("off")
    ax.set_title(title, fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# In a dual encoder the modalities meet only in the final similarity, so the two sides can be computed
# separately (fast retrieval) but never look at each other. In a fusion encoder they meet inside the network:
# words attend to image regions (by cross-attention between two streams, as drawn, or by self-attention over
# one joint sequence in the single-stream VisualBERT and UNITER), which is what binding ("the *red* circle", not just "red" and "circle") needs.
# A generative model lets a decoder attend to the image while it writes.

# %% [markdown]
# ## 1.3 Why it matters
#
# Much of what people want from machines is multimodal: search a photo collection by a sentence, answer
# questions about a picture, describe an image for someone who cannot see it, hold a conversation about a
# chart or a screenshot. Combining modalities matters for three reasons, the first of which 1.1 measured:
#
# 1. **Ambiguity resolves.** Each modality alone leaves the answer open; together they fix it.
# 2. **Supervision is cheap.** Text that people write next to images (captions, alt text) labels those images
#    at web scale; the contrastive models of 1.2 are pre-trained on such pairs alone.
# 3. **Language makes models general.** A model that relates images to sentences can be asked about classes
#    it was never trained on (zero-shot transfer, chapter 2) and composes concepts ("a red triangle") it may
#    never have seen together — or fails to, which is what the compositional split measures.
#
# Why a synthetic world for a book about all this? Because in the shapes world every answer is known
# exactly (1.1 computed the best achievable accuracies without training anything), every caption can be
# checked against its scene, the held-out colour-shape pairs test composition cleanly, and everything is
# generated in seconds on a laptop from a seed, so no download can ever vanish. The price: 32 x 32 pixels,
# six shapes and six colours are far from real photographs and real language; the book says so wherever it
# matters.

# %% [markdown]
# ## 1.4 The structure of the book
#
# The book follows the seed article's nine sections, one chapter each; the library `mmlite` grows with the
# chapters and each chapter imports what the earlier ones built.
#
# | seed section | chapter | what it builds | status |
# |---|---|---|---|
# | 1 background | 1 `01_background` | modalities, measured ambiguity, the field, the data world (`mmlite.data`, `mmlite.text`) | written |
# | 2 core concepts and connections | 2 `02_core_concepts` | representation learning and alignment, the four fusion strategies, pre-training objectives (contrastive, matching with hard negatives, masked LM, captioning), adaptation (freezing, linear probe, zero-shot, soft prompts) | written |
# | 3 core algorithm and steps | 3 `03_algorithms` | the pipeline step by step (data, encoders, fusion, objective), fusion strategies compared on image-text matching, the cost of attention, the modality gap | written |
# | 4 mathematical model and formulas | 4 `04_math` | $y = f(x; \theta)$ and $\theta^* = \arg\min L$, cross-attention derived with sympy, the softmax Jacobian, a NumPy backward pass, the contrastive gradient; the CNN + GRU + cross-attention matching case study | written |
# | 5 project practice: code | 5 | the complete model, trained on GPU or CPU | planned |
# | 6 applications | 6 | retrieval, VQA, captioning, dialogue and reasoning | planned |
# | 7 tools and resources | 7 | tools and resources | planned |
# | 8 summary: trends and challenges | 8 | what remains hard; robustness and efficiency evaluation | planned |
# | 9 appendix: FAQ | 9 | frequently asked questions | planned |

# %% [markdown]
# ## 1.5 A tour of the shapes world
#
# Every later chapter trains and evaluates on this world, so it is worth knowing well. Its dataset card is
# `data/README.md`; its code is `mmlite.data`. A **preset** fixes the split sizes; the **seed** fixes
# everything else, byte for byte.

# %%
print(PRESETS["tiny"])
for name, split in world.items():
    print(f"{name:5s} images {split.images.shape} {split.images.dtype}, objects {split.objects.shape} "
          f"{split.objects.dtype}, {len(split.captions[0])} captions, {len(split.questions[0])} questions")

# %% [markdown]
# ### Images, captions and questions
#
# Twelve training images, each with its first caption (which always lists every object from left to right)
# and one of its questions, with the answer after the "?".

# %%
idx = list(range(12))
titles = [f"{train.captions[i][0]} | {train.questions[i][i % 6][0]} {train.questions[i][i % 6][1]}" for i in idx]
fig = mmlite.plot.image_grid([train.images[i] for i in idx], titles, ncols=6, size=2.3, fontsize=6, wrap=40)
plt.show()

# %% [markdown]
# Behind each image is a **scene**: up to four objects, one row each with columns
# `shape, color, size, x, y, valid` (ids index `SHAPES`, `COLORS`, `SIZES`; x and y are the centre in percent of
# the image side, y growing downwards; empty slots are -1 and come last). All of an image's text is generated
# from this table, which is why it can be checked against it.

# %%
i = 0
print(train.objects[i])
print(train.scene(i))
print("captions: ", train.captions[i])
print("questions:", train.questions[i])
print("negatives:", train.negatives[i])

# %% [markdown]
# `render_scenes` draws any scene, including one written by hand. A large red circle clearly left of a small
# blue square; the renderer anti-aliases edges, adds a textured background, and jitters each object's colour.

# %%
hand = np.array([[[SHAPES.index("circle"), COLORS.index("red"), SIZES.index("large"), 30, 50, 1],
                  [SHAPES.index("square"), COLORS.index("blue"), SIZES.index("small"), 72, 45, 1],
                  [-1, -1, -1, -1, -1, 0], [-1, -1, -1, -1, -1, 0]]], dtype=np.int64)  # (1, 4, 6)
pictures = [render_scenes(hand, size, np.random.default_rng(0))[0] for size in (32, 96)]
for text in ("a large red circle and a small blue square", "the red circle is left of the blue square",
             "the blue square is left of the red circle", "a large blue circle and a small red square",
             "there are two shapes", "a circle under a square"):
    print(f"{text!r:48} -> {caption_truth(text, hand[0])}")
fig = mmlite.plot.image_grid(pictures, ["32 x 32 (the book's size)", "96 x 96"], ncols=2, size=2.4, fontsize=8)
plt.show()

# %% [markdown]
# `caption_truth` returns True, False, or None: the last caption is None because the square is only 5 % of
# the side higher than the circle, inside the relation margin of 15 %, where the world never states a
# relation either way.

# %% [markdown]
# ### Statistics
#
# `describe(split)` counts everything (the same dict `python -m mmlite data` writes to `stats.json`).
# Shapes, colours and sizes are close to uniform, and 1 to 4 objects per image are equally likely.

# %%
stats = {name: describe(split) for name, split in world.items()}
print(f"{'':28s}" + "".join(f"{name:>7s}" for name in SPLITS))
for label, get in [("images", lambda s: s["images"]), ("objects", lambda s: s["objects"]),
                   ("held-out colour-shape objects", lambda s: s["held_out_objects"]),
                   ("share of yes among yes/no", lambda s: f'{s["yes_fraction"]:.3f}')] + \
                  [(f"negatives {k}", lambda s, k=k: s["negatives"][k]) for k in NEGATIVE_KINDS]:
    print(f"{label:28s}" + "".join(f"{get(stats[name]):>7}" for name in SPLITS))

# %%
s = stats["train"]
fig, axes = plt.subplots(1, 5, figsize=(14, 2.6), gridspec_kw={"width_ratios": [6, 6, 2, 4, 10]})
axes[0].bar(SHAPES, [s["shape"][k] for k in SHAPES], color="0.5")
axes[1].bar(COLORS, [s["color"][k] for k in COLORS], color=np.array(COLOR_RGB) / 255)
axes[2].bar(SIZES, [s["size"][k] for k in SIZES], color="0.5")
axes[3].bar(list(s["objects_per_image"]), list(s["objects_per_image"].values()), color="0.5")
lengths = {int(k): v for k, v in s["caption_words"].items()}
axes[4].bar(list(lengths), list(lengths.values()), color="0.5")
for ax, title in zip(axes, ["objects per shape", "objects per colour", "per size", "objects per image",
                            "caption length (words)"]):
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6, axis="both")
    plt.setp(ax.get_xticklabels(), rotation=45)
fig.suptitle("train split", fontsize=9)
fig.tight_layout()
plt.show()
mean_len = sum(k * v for k, v in lengths.items()) / sum(lengths.values())
print(f"captions: {sum(lengths.values())}, {min(lengths)} to {max(lengths)} words, mean {mean_len:.2f}")

# %% [markdown]
# Answers per question type. Yes/no answers are balanced by construction (0.499 to 0.500 "yes" in every split),
# colours and shapes are near uniform, but counts lean towards "one" — the skew the text-only predictor of
# 1.1 exploited.

# %%
fig, axes = plt.subplots(1, 6, figsize=(14, 2.4), gridspec_kw={"width_ratios": [6, 6, 2, 5, 2, 8]})
for ax, t in zip(axes, QUESTION_TYPES):
    answers = s["answers"][t]
    ax.bar(list(answers), list(answers.values()), color="0.5")
    ax.set_title(f"{t} ({sum(answers.values())})", fontsize=8)
    ax.tick_params(labelsize=6)
    plt.setp(ax.get_xticklabels(), rotation=60)
fig.tight_layout()
plt.show()
for t in QUESTION_TYPES:
    print(f"{t:9s}", s["answers"][t])

# %% [markdown]
# ### The compositional split
#
# Six colour-shape pairs are **held out**: they never occur in train, val or test, and every scene of the
# `comp` split contains at least one of them. The pairs form a Latin square — each colour and each shape is held
# out exactly once — so a model has seen every colour and every shape in training, just never these
# combinations. Accuracy on `comp` therefore measures whether a model composes what it learned. Below, the count
# of every colour-shape pair in train and in comp; the held-out cells are outlined.

# %%
def pair_counts(split) -> np.ndarray:
    """Objects per (colour, shape) pair: (6, 6), rows = COLORS, columns = SHAPES."""
    objs = split.objects[split.objects[..., 5] == 1]  # (n_objects, 6) valid rows
    grid = np.zeros((len(COLORS), len(SHAPES)), dtype=np.int64)
    np.add.at(grid, (objs[:, 1], objs[:, 0]), 1)
    return grid


counts = {name: pair_counts(split) for name, split in world.items()}
held = [(COLORS.index(c), SHAPES.index(sh)) for c, sh in HELD_OUT_PAIRS]
fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
for ax, name in zip(axes, ("train", "comp")):
    mmlite.plot.heatmap(ax, counts[name], COLORS, SHAPES, title=f"{name}: objects per colour-shape pair",
                        cmap="Greys")
    for (r, c), v in np.ndenumerate(counts[name]):  # dark text on light cells, light text on dark ones
        ax.text(c, r, str(v), ha="center", va="center", fontsize=7,
                color="w" if v > counts[name].max() / 2 else "k")
    for r, c in held:
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2))
fig.tight_layout()
plt.show()

print(f"{'held-out pair':16s}" + "".join(f"{name:>7s}" for name in SPLITS))
for (c, sh), (r, k) in zip(HELD_OUT_PAIRS, held):
    print(f"{c + ' ' + sh:16s}" + "".join(f"{counts[name][r, k]:>7d}" for name in SPLITS))
for name in ("train", "val", "test"):
    assert all(counts[name][r, k] == 0 for r, k in held), name
assert all(counts["comp"][r, k] > 0 for r, k in held)
comp_scenes = [any((o[1], o[0]) in held for o in scene_list(row)) for row in world["comp"].objects]
print(f"comp scenes holding a held-out pair: {sum(comp_scenes)} of {len(comp_scenes)}")
assert all(comp_scenes)

# %% [markdown]
# ### Hard negatives
#
# Each image has up to three false captions, one per kind: `swap_attribute` (the same words in a different
# binding), `swap_relation` (the two sides of a relation exchanged), `change_color` (one colour word replaced).
# Each is checked to be **False** for its scene, not merely a different string. One-object scenes allow only
# `change_color`, so that kind is present for every image and the others for fewer. Every negative records
# the true caption it was edited from: `split.negative_sources[i][k]` belongs to `split.negatives[i][k]`, and
# is one of the image's five captions or a fresh true listing or relation of its scene. Below, for each kind,
# the first test image (other than the one of 1.1, one image per kind) whose negative was edited from one of
# its own captions, shown side by side, and how often the source is one of the image's captions.

# %%
shown = []  # (image, kind, true caption, negative)
for kind in NEGATIVE_KINDS:
    shown.append(next((i, kind, src, neg) for i, (caps, negs, srcs) in
                      enumerate(zip(test.captions, test.negatives, test.negative_sources))
                      if i not in [match_example[0]] + [x[0] for x in shown]
                      for (neg, k), src in zip(negs, srcs) if k == kind and src in caps))
for i, kind, c, neg in shown:
    print(f"image {i:3d} {kind:15s} true:  {c!r:55} {caption_truth(c, test.objects[i])}")
    print(f"{'':25s} false: {neg!r:55} {caption_truth(neg, test.objects[i])}")
fig = mmlite.plot.image_grid([test.images[i] for i, *_ in shown],
                             [f"{kind} | true: {c} | false: {neg}" for i, kind, c, neg in shown],
                             ncols=3, size=2.6, fontsize=6.5, wrap=44)
plt.show()
print("negatives per image (train):", stats["train"]["negatives_per_image"])
own = Counter(kind for caps, negs, srcs in zip(test.captions, test.negatives, test.negative_sources)
              for (_, kind), src in zip(negs, srcs) if src in caps)
print("test negatives edited from one of the image's own captions:",
      ", ".join(f"{kind} {own[kind]} of {stats['test']['negatives'][kind]}" for kind in NEGATIVE_KINDS))
assert all(caption_truth(src, test.objects[i]) is True
           for i, srcs in enumerate(test.negative_sources) for src in srcs)  # every source is true of its image

# %% [markdown]
# ### The tokenizer
#
# Models read token ids, not strings. `build_tokenizer()` is a word-level tokenizer over the 59 words the
# grammar can emit, after seven special tokens: `[PAD]` pads a batch to equal length, `[CLS]` and `[SEP]` mark
# the summary position and a segment boundary, `[MASK]` hides a word for masked language modelling, `[UNK]`
# stands for any unknown word, `[BOS]` and `[EOS]` start and end a caption for generation.

# %%
tok = build_tokenizer()
print(tok, "| vocabulary size", len(tok))
print("specials:", {t: tok.token_to_id[t] for t in tok.specials})
caption = train.captions[0][0]
ids = tok.encode(caption, add_bos_eos=True)
print(repr(caption))
print("ids:     ", ids)
print("tokens:  ", [tok.id_to_token(j) for j in ids])
print("decoded: ", repr(tok.decode(ids)))
assert tok.decode(ids) == caption

# %% [markdown]
# A word outside the vocabulary becomes `[UNK]` (id 4) by default. That is convenient for free text, and
# dangerous for the book's own data, where an unknown word means a bug; the dataset therefore encodes with
# `strict=True`, which raises an error naming the word and its position.

# %%
odd = "is there a pink circle ?"
ids = tok.encode(odd)
print(ids, "->", repr(tok.decode(ids, skip_special=False)))
try:
    tok.encode(odd, strict=True)
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ### A batch
#
# `make_loader` turns a split into batches of tensors. Each visit of an image draws one of its captions, one
# of its hard negatives and one of its questions, from a seed and the epoch number only, so a run is
# reproducible. Token sequences are right-padded with `[PAD]` and come with a boolean mask, True for real tokens
# (the convention of the whole library). Images are batch-first float tensors (B, 3, H, W) in [0, 1].

# %%
loader = make_loader(train, tok, batch_size=8, shuffle=True, seed=0)
batch = next(iter(loader))
for key, value in batch.items():
    print(f"{key:15s} {str(tuple(value.shape)):16s} {str(value.dtype):14s}")
b = 0
print("image", batch["image_index"][b].item(), "| caption:", repr(tok.decode(batch["caption_ids"][b])))
print("negative:", repr(tok.decode(batch["negative_ids"][b])), NEGATIVE_KINDS[batch["negative_kind"][b]])
print("question:", repr(tok.decode(batch["question_ids"][b])), "->", ANSWERS[batch["answer"][b]])
print("caption mask row:", batch["caption_mask"][b].int().tolist())
assert batch["image"].shape[1:] == (3, 32, 32) and 0 <= batch["image"].min() and batch["image"].max() <= 1
assert (batch["caption_ids"][~batch["caption_mask"]] == tok.pad_id).all()

# %% [markdown]
# ## Summary
#
# - A modality is a kind of signal with its own structure. On the shapes world's test questions, the best
#   image-only predictor cannot exceed 0.255 accuracy and the best text-only rule learned from train reaches
#   0.387 (0.380 from the question's type alone, whose real chance level is its majority answer, not
#   1/#answers), while reading the question *and* the scene gives 1.000: combining modalities is not a
#   refinement but a necessity. Caption/negative pairs with identical words show the same for matching.
# - The book writes every model as $y = f(x_1, x_2; \theta)$ with an image $x_1$, a text $x_2$ and learned
#   parameters $\theta$; chapter 4 adds $\theta^* = \arg\min_\theta L$.
# - The field moved from task-specific models to pre-trained fusion encoders (two-stream ViLBERT and LXMERT,
#   single-stream VisualBERT and UNITER, ALBEF), dual encoders trained contrastively at web scale (CLIP, ALIGN),
#   and generative models that connect vision to language models (BLIP, Flamingo, LLaVA). They differ in where
#   the modalities meet. Of the seed article's examples, Turing-NLG and GPT-3 are text-only language models,
#   not multimodal ones.
# - The shapes world gives exact answers, checkable captions, hard negatives of three kinds, a compositional
#   split with six held-out colour-shape pairs, a 66-token word-level tokenizer, and reproducible batches.

# %% [markdown]
# ## Exercises
#
# 1. Which colour will the text-only rule of 1.1 never answer to "what color is the triangle ?", and why?
#    Compute that question's answer counts in train and the rule's answer.
# 2. The image-only bound of 1.1 used the test split. Compute it on `val` and on `comp`, and the largest
#    number of equal answers among one image's six questions. Why is that number so small? (Hint: which
#    question types answer from disjoint sets of answers?)
# 3. Write the scene of a small green star at (25, 30) above a large yellow diamond at (60, 75) as an objects
#    array, and check with `caption_truth` that "the green star is above the yellow diamond" is True and its
#    `swap_relation` negative is False. Is "a green star to the left of a yellow diamond" decided?
# 4. How many of the 36 colour-shape pairs occur in train, and how many objects of a held-out pair does
#    `comp` hold in total?
# 5. Encode "what colour is the circle ?" (British spelling) with the tokenizer. Which id does "colour" get,
#    and what does `strict=True` report?

# %% [markdown]
# **Solution 1.** Red triangles are held out of train, so "red" never answers this question there and the rule,
# which knows only train, never says it; on `comp`, where red triangles are common, it is wrong on every one.

# %%
q = "what color is the triangle ?"
print(dict(by_question[q]), "-> text-only answer:", most_frequent(by_question[q]))
assert by_question[q]["red"] == 0 and sum(by_question[q].values()) > 0

# %% [markdown]
# **Solution 2.** Colour, shape, size and count questions answer from four disjoint sets (colours, shapes,
# sizes, numbers), so answers can only repeat among the yes/no types (exist, relation, and the rare exist
# question that replaces a colour or shape question) or between a shape question and a "what shape is left
# of ..." relation question. Most images therefore have at most two equal answers, and the bound stays near
# 1/4 on every split.

# %%
for name in ("val", "comp"):
    qs_all = world[name].questions
    per_image = [max(Counter(a for _, a, _ in qs).values()) for qs in qs_all]
    print(f"{name}: image-only upper bound {sum(per_image) / (6 * len(qs_all)):.3f}; images by largest number "
          f"of equal answers: {dict(sorted(Counter(per_image).items()))}")
    assert sum(per_image) / (6 * len(qs_all)) < 0.3 and max(per_image) <= 3

# %% [markdown]
# **Solution 3.** The star is 35 % of the side left of the diamond, more than the 15 % margin, so the
# left-of caption is decided too (True).

# %%
scene = np.array([[SHAPES.index("star"), COLORS.index("green"), SIZES.index("small"), 25, 30, 1],
                  [SHAPES.index("diamond"), COLORS.index("yellow"), SIZES.index("large"), 60, 75, 1],
                  [-1, -1, -1, -1, -1, 0], [-1, -1, -1, -1, -1, 0]], dtype=np.int64)  # (4, 6)
checks = {c: caption_truth(c, scene) for c in ("the green star is above the yellow diamond",
                                               "the yellow diamond is above the green star",
                                               "a green star to the left of a yellow diamond")}
print(checks)
assert list(checks.values()) == [True, False, True]

# %% [markdown]
# **Solution 4.**

# %%
n_pairs = int((counts["train"] > 0).sum())
n_held = sum(int(counts["comp"][r, k]) for r, k in held)
print(f"pairs in train: {n_pairs} of 36; held-out objects in comp: {n_held}")
assert n_pairs == 30 and n_held == stats["comp"]["held_out_objects"]

# %% [markdown]
# **Solution 5.**

# %%
ids = tok.encode("what colour is the circle ?")
print(ids)
assert ids[1] == tok.unk_id and tok.unk_id not in ids[:1] + ids[2:]
try:
    tok.encode("what colour is the circle ?", strict=True)
except ValueError as err:
    print("ValueError:", err)
    assert "'colour' at position 1" in str(err)
