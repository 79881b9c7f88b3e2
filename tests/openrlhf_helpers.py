"""Shared scaffolding of the OpenRLHF tests (test_openrlhf_experience, test_openrlhf_actor, test_backend_parity):
tiny models, a parsed launch plan, OpenRLHF's experience makers around in-process model groups, rollouts built by
OpenRLHF's own samples generator, and OpenRLHF's actor trainer with a recording CPU strategy. Only what needs CUDA
(DeepSpeed model groups, the DeepSpeed strategy, the NCCL world) is replaced."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.append(str(Path(__file__).parent / "stubs"))  # vllm / flash_attn import stand-ins when not installed

from openrlhf.models import Actor  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator  # noqa: E402
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer  # noqa: E402

from gold_plugin.integrations.openrlhf.actor import GoldActorPPOTrainer  # noqa: E402
from gold_plugin.integrations.openrlhf.args import build_parser  # noqa: E402
from gold_plugin.integrations.openrlhf.experience_maker import GoldExperienceMaker  # noqa: E402
from gold_plugin.integrations.openrlhf.launch_plan import resolve_launch  # noqa: E402
from gold_plugin.integrations.openrlhf.prompts import build_prompt_lookup, build_reference_lookup  # noqa: E402
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer  # noqa: E402
from gold_plugin.step import LogitVocab  # noqa: E402
from gold_plugin.teacher import HFTeacher  # noqa: E402
from gold_plugin.testing.tiny_teacher import save_tiny_teacher  # noqa: E402

TOPK = 4
ROWS = [
    {"input": "What is 3 + 4?", "label": "7"},
    {"input": "Name a French pastry.", "label": "croissant"},
    {"input": "Spell 'naïve' with its accent.", "label": "naïve"},
]
RESPONSES = [  # two samples per prompt; the last of each pair is cut (no EOS)
    ("3 + 4 = 7. The answer is 7.", True),
    ("It is 7, I think", False),
    ("A croissant — café au lait ☕", True),
    ("Pain au chocolat!", True),
    ("naïve: n-a-ï-v-e", True),
    ("Surely ‘naive’ works too", False),
]
REWARDS = [1.0, 0.0, 1.0, 0.5, 1.0, 0.0]


def build_models(tmp_path_factory) -> SimpleNamespace:
    """Tiny Llamas: student and reference with the Qwen tokenizer, teacher with the Mistral one."""
    student_dir = save_tiny_teacher(tmp_path_factory.mktemp("student"), "qwen", seed=1)
    teacher_dir = save_tiny_teacher(tmp_path_factory.mktemp("teacher"), "mistral", seed=2)
    ref_dir = save_tiny_teacher(tmp_path_factory.mktemp("ref"), "qwen", seed=3)
    from transformers import LlamaForCausalLM

    student = LlamaForCausalLM.from_pretrained(student_dir).eval()
    reference = LlamaForCausalLM.from_pretrained(ref_dir).eval()
    scorers = []

    def local_teacher():
        if not scorers:
            scorers.append(
                HFTeacher(str(teacher_dir), device="cpu", tokenizer=load_packaged_tokenizer("mistral"))
            )
        return scorers[0]

    return SimpleNamespace(
        student_dir=student_dir,
        teacher_dir=teacher_dir,
        student=student,
        reference=reference,
        local_teacher=local_teacher,
    )


def make_plan(models, alpha: float, extra: str = "", estimator: str = "group_norm"):
    advantages = re.search(r"--gold\.signal (advantage|both)", extra)
    argv = (
        f"--actor.model_name_or_path {models.student_dir} --gold.teacher.model_name_or_path {models.teacher_dir} "
        f"--gold.teacher.num_gpus_per_replica 0 --gold.teacher.topk {TOPK} --gold.teacher.micro_batch_size 4 "
        f"--data.prompt_dataset unused.jsonl --data.apply_chat_template --data.label_key label "
        f"--data.output_key label "
        f"--algo.advantage.estimator {estimator} --rollout.n_samples_per_prompt 2 --rollout.batch_size 3 "
        f"--rollout.micro_batch_size 2 --actor.num_nodes 1 --actor.num_gpus_per_node 2 --vllm.num_engines 1 "
        f"--algo.kl.init_coef 0.05 --algo.kl.use_loss --gold.alpha {alpha} {'--gold.kl_coef 2.0' if advantages else ''} "
        f"--gold.kl_discount 0.5 --reward.remote_url /unused/reward.py {extra}"
    ).split()
    return resolve_launch(build_parser().parse_args(argv))


class LocalModelGroup:
    """In-process stand-in for an OpenRLHF ``RayActorGroup`` whose DeepSpeed actors need CUDA.

    ``async_run_method_batch("forward", sequences=[...], ...)`` runs ``forward`` on every micro-batch here and
    returns a Ray object ref of the results, exactly the shape OpenRLHF's group returns (one chunk, one actor).
    """

    def __init__(self, forward):
        self.forward = forward
        self.calls = 0

    def async_run_method_batch(self, method_name, **kwargs):
        assert method_name == "forward"
        self.calls += 1
        count = len(next(iter(kwargs.values())))
        results = [self.forward(**{k: v[i] for k, v in kwargs.items()}) for i in range(count)]
        import ray

        return [ray.put(results)]

    def async_run_method(self, method_name, *args, **kwargs):
        return []


def log_prob_group(model, temperature: float = 1.0):
    actor = Actor(model, temperature=temperature)  # OpenRLHF's actor workers use --rollout.temperature
    actor.packing_samples = False  # set by Actor.__init__ only when it loads the model itself

    def forward(sequences, action_mask, attention_mask, mm_train_inputs_list=None):
        with torch.no_grad():
            return actor(sequences, action_mask, attention_mask)

    return LocalModelGroup(forward)


class RefusingRewardGroup(LocalModelGroup):
    def __init__(self):
        super().__init__(None)

    def async_run_method_batch(self, method_name, **kwargs):
        raise AssertionError("a reward model was asked for a reward")


def critic_group():
    def forward(sequences, action_mask, attention_mask, **_):
        return torch.linspace(-0.5, 0.5, action_mask.numel()).reshape(action_mask.shape) * action_mask

    return LocalModelGroup(forward)


def make_rollouts(strategy, student_tok, rewards=REWARDS, unknown_prompt: bool = True) -> list:
    """Experiences built by OpenRLHF's own samples generator from vLLM-shaped responses.

    ``unknown_prompt``: sample 4's prompt is one the prompt lookup does not know (the teacher then falls back to
    the student's prompt text).
    """
    samples = []
    for index, ((text, ends), reward) in enumerate(zip(RESPONSES, rewards)):
        row = ROWS[index // 2]
        prompt = chat_prompt(student_tok, row)
        if index == 4 and unknown_prompt:
            prompt = prompt.replace("Spell", "Please spell")
        response_ids = student_tok(text, add_special_tokens=False)["input_ids"]
        if ends:
            response_ids = response_ids + [student_tok.convert_tokens_to_ids("<|im_end|>")]
        samples.append(
            rollout_sample(strategy, student_tok, prompt, row["label"], response_ids, reward, ends)
        )
    return samples


def chat_prompt(student_tok, row: dict) -> str:
    """The student's prompt string of a dataset row (its chat template, as ``--data.apply_chat_template``)."""
    return student_tok.apply_chat_template(
        [{"role": "user", "content": row["input"]}], tokenize=False, add_generation_prompt=True
    )


def rollout_sample(
    strategy, student_tok, prompt: str, label: str, response_ids: list, reward: float, ends: bool
):
    """One rollout sample with exactly these response ids, built by OpenRLHF's own samples generator from a
    vLLM-shaped response (``ends``: finished with EOS rather than cut at the length limit)."""
    generator = SamplesGenerator(strategy, None, None, student_tok, vllm_engines=[])
    prompt_ids = student_tok(prompt, add_special_tokens=False)["input_ids"]
    response = {
        "prompt": prompt,
        "label": label,
        "observation_tokens": prompt_ids + list(response_ids),
        "action_ranges": [(len(prompt_ids), len(prompt_ids) + len(response_ids))],
        "rollout_log_probs": None,
        "reward": reward,
        "scores": reward,
        "truncated": not ends,
    }
    return generator._process_response_into_experience(response, max_len=1024)


def make_makers(models, teacher, plan, critic=False, rows=ROWS):
    student_tok = load_packaged_tokenizer("qwen")
    strategy = SimpleNamespace(args=plan.args)
    groups = dict(
        actor_model_group=log_prob_group(models.student, plan.args.rollout.temperature),
        critic_model_group=critic_group() if critic else None,
        reward_model_group=RefusingRewardGroup(),
        initial_model_group=log_prob_group(models.reference, plan.args.rollout.temperature),
        kl_controller=FixedKLController(plan.args.algo.kl.init_coef),
        strategy=strategy,
        tokenizer=student_tok,
    )
    lookup = build_prompt_lookup(rows, student_tok, plan.args.data)
    references = build_reference_lookup(rows, student_tok, plan.args.data, plan.args.data.output_key)
    gold = GoldExperienceMaker(
        **groups,
        teacher=teacher,
        gold_config=plan.gold,
        teacher_tokenizer=load_packaged_tokenizer("mistral"),
        prompt_lookup=lookup,
        reference_lookup=references,
    )
    base = RemoteExperienceMaker(**groups)
    return gold, base, strategy, student_tok


class RecordingStrategy:
    """The DeepSpeed strategy's training-step surface, on CPU: records every backward."""

    def __init__(self, args):
        self.args = args
        self.ring_attn_group = None
        self.accumulated_gradient = 1
        self.losses: list[torch.Tensor] = []

    def backward(self, loss, model, optimizer, **kwargs):
        self.losses.append(loss.detach().clone())
        loss.backward()

    def optimizer_step(self, optimizer, model, scheduler, name="model", **kwargs):
        optimizer.step()
        scheduler.step()

    def moving_average(self, *args, **kwargs):
        raise AssertionError("no EMA in this test")

    def get_grad_norm(self, model):
        return 0.0

    def all_reduce(self, data, op="mean"):
        return data

    def is_rank_0(self):
        return True

    def print(self, *args):
        pass


def init_gloo(tmp_path_factory) -> None:
    """A one-process gloo group standing in for the NCCL world (OpenRLHF's loss normalisers all-reduce)."""
    if not dist.is_initialized():
        rendezvous = tmp_path_factory.mktemp("gloo") / "rendezvous"
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)


def make_trainer(setup, monkeypatch, gold: bool):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the replay buffer only names a device
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    model = LlamaForCausalLM.from_pretrained(setup.student_dir)
    actor = Actor(model, temperature=setup.plan.args.rollout.temperature)  # as OpenRLHF's actor worker
    actor.packing_samples = False
    optimizer = torch.optim.SGD(actor.parameters(), lr=0.0)  # lr 0: both runs see the same weights
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    strategy = RecordingStrategy(setup.plan.args)
    trainer = ActorPPOTrainer(strategy, actor, None, optimizer, scheduler, tokenizer=setup.tok)
    if gold:
        trainer.__class__ = GoldActorPPOTrainer
        trainer.setup_gold(setup.plan.gold, getattr(setup, "vocab", None) or LogitVocab(setup.mapping))
    return trainer, strategy, actor
