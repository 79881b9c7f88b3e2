"""GOLD trainer wiring: the experience maker swap and the raw-prompt lookup, with OpenRLHF's own dataset loader."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.append(str(Path(__file__).parent / "stubs"))  # vllm / flash_attn import stand-ins when not installed

from openrlhf.datasets import PromptDataset  # noqa: E402
from openrlhf.trainer.ppo_trainer import PPOTrainer  # noqa: E402
from openrlhf.trainer.ppo_trainer_async import (  # noqa: E402
    GenerateSamplesActor,
    PPOTrainerAsync,
    TrainingActor,
)
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402

from gold_plugin.integrations.openrlhf.args import build_parser  # noqa: E402
from gold_plugin.integrations.openrlhf.experience_maker import GoldExperienceMaker  # noqa: E402
from gold_plugin.integrations.openrlhf.launch_plan import resolve_launch  # noqa: E402
from gold_plugin.integrations.openrlhf.trainer import (  # noqa: E402
    GoldGenerateSamplesActor,
    GoldPPOTrainer,
    GoldPPOTrainerAsync,
    GoldTrainingActor,
    install_gold_experience_maker,
    seed_prompt_order,
)
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer, tokenizer_dir  # noqa: E402

ROWS = [
    {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "label": "4",
    },
    {"messages": [{"role": "user", "content": "Name a colour."}], "label": "red"},
]


class Strategy:
    def __init__(self, args):
        self.args = args

    def print(self, *args):
        pass

    def is_rank_0(self):
        return True


@pytest.fixture
def strategy(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    argv = (
        f"--actor.model_name_or_path {tokenizer_dir('qwen')} --gold.teacher.model_name_or_path {tokenizer_dir('mistral')} "
        f"--data.prompt_dataset {data} --data.input_key messages --data.label_key label --data.apply_chat_template "
        "--algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 2 --algo.kl.init_coef 0 "
        "--vllm.num_engines 1 --actor.num_gpus_per_node 1"
    ).split()
    return Strategy(resolve_launch(build_parser().parse_args(argv)).args)


def test_trainer_classes_subclass_openrlhfs_ray_actor_classes():
    assert issubclass(GoldPPOTrainer.__ray_actor_class__, PPOTrainer.__ray_actor_class__)
    assert issubclass(GoldGenerateSamplesActor.__ray_actor_class__, GenerateSamplesActor.__ray_actor_class__)
    assert issubclass(GoldTrainingActor.__ray_actor_class__, TrainingActor.__ray_actor_class__)
    assert issubclass(GoldPPOTrainerAsync.__ray_actor_class__, PPOTrainerAsync.__ray_actor_class__)


def test_install_swaps_in_the_gold_maker_with_a_lookup_for_every_dataset_prompt(strategy):
    student = load_packaged_tokenizer("qwen")
    groups = [object(), None, None, object()]
    base = RemoteExperienceMaker(*groups, FixedKLController(0.0), strategy, student)
    trainer = SimpleNamespace(strategy=strategy, tokenizer=student, experience_maker=base)
    maker = install_gold_experience_maker(trainer, teacher=object())
    assert isinstance(trainer.experience_maker, GoldExperienceMaker) and maker is trainer.experience_maker
    assert maker.actor_model_group is groups[0] and maker.initial_model_group is groups[3]
    assert maker.reward_model_group is None and maker.kl_ctl is base.kl_ctl
    assert len(maker.teacher_tokenizer) == len(load_packaged_tokenizer("mistral"))

    # The keys are exactly the prompt strings OpenRLHF's PromptDataset gives the rollouts.
    from datasets import Dataset

    dataset = PromptDataset(Dataset.from_list(ROWS), student, strategy)
    assert sorted(maker.prompt_lookup) == sorted(dataset.prompts)
    by_prompt = dict(zip(dataset.prompts, ROWS))
    for prompt, messages in maker.prompt_lookup.items():
        assert messages == by_prompt[prompt]["messages"]


def test_chat_messages_accepts_text_and_chat_and_refuses_other_prompts():
    from gold_plugin.step import chat_messages

    assert chat_messages("Hi") == [{"role": "user", "content": "Hi"}]
    chat = [{"role": "user", "content": "Hi"}]
    copied = chat_messages(chat)
    assert copied == chat and copied[0] is not chat[0]
    assert chat_messages({"text": "Hi"}) is None
    assert chat_messages([]) is None and chat_messages(None) is None


class _Recorder:
    """Stands in for the Ray-side objects of ``train()``; records what it was asked to create and call."""

    def __init__(self):
        self.groups: list[dict] = []
        self.vllm_kwargs: dict | None = None
        self.teacher_placement = "unset"
        self.trainer_args: tuple | None = None
        self.calls: list[str] = []

    def actor_group(self, num_nodes, num_gpus_per_node, actor_type, pg=None, num_gpus_per_actor=1, **kwargs):
        recorder = self
        entry = dict(type=actor_type, gpus=num_nodes * num_gpus_per_node, pg=pg, share=num_gpus_per_actor)
        self.groups.append(entry)

        class Group:
            def async_init_model_from_pretrained(self, *args):
                recorder.calls.append("init")
                return []

            def async_save_model(self):
                recorder.calls.append("save")
                return []

        return Group()


def _run_train(monkeypatch, argv):
    from gold_plugin.integrations.openrlhf import actor as actor_module
    from gold_plugin.integrations.openrlhf import train as train_module
    from gold_plugin.integrations.openrlhf import trainer as trainer_module

    rec = _Recorder()
    plan = resolve_launch(build_parser().parse_args(argv))

    class FakeRay:
        is_initialized = staticmethod(lambda: True)
        get = staticmethod(lambda x: 7 if x == "max_steps" else x)

    class FakeTrainer:
        @classmethod
        def remote(cls, *args, **kwargs):
            rec.trainer_args = (cls.kind, args, kwargs)
            return SimpleNamespace(
                get_max_steps=SimpleNamespace(remote=lambda: "max_steps"),
                fit=SimpleNamespace(remote=lambda: rec.calls.append("fit")),
            )

    class Sync(FakeTrainer):
        kind = "sync"

    class Async(FakeTrainer):
        kind = "async"

    def teacher_group(plan, placement):
        rec.teacher_placement = placement
        return SimpleNamespace(close=lambda: rec.calls.append("teacher close"))

    def vllm_engines(*args, **kwargs):
        rec.vllm_kwargs = kwargs
        return ["engine"] * args[0]

    monkeypatch.setattr(train_module, "ray", FakeRay)
    monkeypatch.setattr(
        train_module, "placement_group", lambda bundles, strategy: SimpleNamespace(ready=lambda: None)
    )
    monkeypatch.setattr(train_module, "create_teacher_group", teacher_group)
    monkeypatch.setattr("openrlhf.trainer.ray.create_vllm_engines", vllm_engines)
    monkeypatch.setattr("openrlhf.trainer.ray.launcher.RayActorGroup", rec.actor_group)
    monkeypatch.setattr(
        "openrlhf.utils.get_strategy", lambda args: SimpleNamespace(args=args, print=lambda *a: None)
    )
    monkeypatch.setattr(trainer_module, "GoldPPOTrainer", Sync)
    monkeypatch.setattr(trainer_module, "GoldPPOTrainerAsync", Async)
    train_module.train(plan)
    return rec, actor_module


BASE = (
    "--actor.model_name_or_path /m/student --gold.teacher.model_name_or_path /m/teacher --data.prompt_dataset d "
    "--rollout.n_samples_per_prompt 4 --vllm.num_engines 2 --actor.num_gpus_per_node 2"
)


def test_reward_free_layout_has_no_reward_group_no_reference_and_no_reward_function(monkeypatch):
    argv = (
        BASE + " --algo.advantage.estimator reinforce --algo.kl.init_coef 0 --reward.remote_url r.py"
    ).split()
    rec, actor_module = _run_train(monkeypatch, argv)
    assert rec.groups[0]["type"] is actor_module.GoldPolicyModelActor
    assert len(rec.groups) == 1  # actor only: no reference, critic or reward-model group
    assert rec.vllm_kwargs["remote_rm_url"] is None  # the vLLM engines call no reward function
    assert rec.teacher_placement is None  # own GPUs
    kind, args, kwargs = rec.trainer_args
    assert kind == "sync" and args[4] is None and args[5] is None and "teacher" in kwargs
    assert rec.calls == ["init", "fit", "save", "teacher close"]


def test_grpo_mix_colocates_teacher_and_reference_with_the_actor(monkeypatch):
    argv = (
        BASE + " --algo.advantage.estimator group_norm --gold.alpha 0.5 --reward.remote_url r.py "
        "--algo.kl.init_coef 0.001 --algo.kl.use_loss --train.colocate_actor_ref --train.async_enable"
    ).split()
    rec, _ = _run_train(monkeypatch, argv)
    assert len(rec.groups) == 2  # actor + reference, no reward model: the reward comes from r.py
    actor_pg = rec.groups[0]["pg"]
    assert actor_pg is not None and rec.groups[1]["pg"] is actor_pg and rec.groups[1]["share"] == 0.2
    assert rec.teacher_placement is actor_pg  # placed like OpenRLHF's reference model
    assert rec.vllm_kwargs["remote_rm_url"] == ["r.py"]
    assert rec.trainer_args[0] == "async"


def test_teacher_group_options_follow_the_placement(monkeypatch):
    import gold_plugin.teacher as teacher_package
    from gold_plugin.integrations.openrlhf.train import create_teacher_group

    created = []
    monkeypatch.setattr(
        teacher_package, "TeacherGroup", lambda config, **kw: created.append((config, kw)) or "group"
    )
    argv = (
        BASE + " --algo.advantage.estimator reinforce --algo.kl.init_coef 0 --gold.teacher.backend vllm"
    ).split()
    plan = resolve_launch(build_parser().parse_args(argv))
    assert create_teacher_group(plan, None) == "group"
    assert created[-1][1]["actor_options"] == {} and created[-1][1]["scorer_overrides"] == {}
    from ray.util.placement_group import PlacementGroup

    pg = PlacementGroup.empty()
    create_teacher_group(plan, pg)
    options = created[-1][1]["actor_options"]
    assert options["num_gpus"] == 0.2 and options["scheduling_strategy"].placement_group is pg
    assert created[-1][1]["scorer_overrides"] == {"gpu_memory_utilization": 0.2}
    assert created[-1][0] is plan.gold


def test_async_trainer_wires_the_gold_training_actor_to_openrlhfs_generator(monkeypatch, strategy):
    from gold_plugin.integrations.openrlhf import trainer as trainer_module

    made = {}

    class FakeQueue:
        def __init__(self, maxsize):
            self.items = []
            self.maxsize = maxsize

        def put(self, item, block=True):
            self.items.append(item)

    def remote_class(name):
        return SimpleNamespace(remote=lambda *args, **kwargs: made.setdefault(name, (args, kwargs)) and name)

    import openrlhf.trainer.ppo_trainer_async as openrlhf_async

    monkeypatch.setattr(openrlhf_async, "Queue", FakeQueue)  # OpenRLHF's own constructor builds the parts
    monkeypatch.setattr(openrlhf_async, "VLLMLock", remote_class("lock"))
    monkeypatch.setattr(trainer_module, "GoldGenerateSamplesActor", remote_class("generator"))
    monkeypatch.setattr(trainer_module, "GoldTrainingActor", remote_class("gold_trainer"))
    strategy.args.train.async_queue_size = 2
    instance = object.__new__(GoldPPOTrainerAsync.__ray_actor_class__)
    teacher = object()
    GoldPPOTrainerAsync.__ray_actor_class__.__init__(
        instance, "/m/student", strategy, "actor", None, None, "ref", ["engine"], teacher=teacher, max_len=64
    )
    assert instance.trainer_actor == "gold_trainer" and instance.generator_actor == "generator"
    args, kwargs = made["gold_trainer"]
    passed = dict(
        pretrain="/m/student", strategy=strategy, actor_model_group="actor", critic_model_group=None,
        reward_model_group=None, reference_model_group="ref", vllm_engines=["engine"],
    )  # fmt: skip
    assert args == () and {k: kwargs[k] for k in passed} == passed and kwargs["teacher"] is teacher
    gen_kwargs = made["generator"][1]
    assert gen_kwargs["max_len"] == 64 and gen_kwargs["rollout_queue"] is kwargs["rollout_queue"]
    assert kwargs["rollout_slots"].items == [0, 0] and kwargs["vllm_lock"] == "lock"
    assert strategy.args.eval.steps == float("inf") and strategy.args.ckpt.save_steps == float("inf")
    # OpenRLHF's names are its own again after the constructor.
    assert (
        openrlhf_async.TrainingActor is TrainingActor
        and openrlhf_async.GenerateSamplesActor is GenerateSamplesActor
    )


@pytest.mark.parametrize("trainer_class", [GoldPPOTrainer, GoldTrainingActor])
def test_the_off_policy_draw_is_made_at_openrlhfs_global_step(trainer_class):
    """OpenRLHF's own ``train_step`` (sync and async) makes the batch's experiences after the GOLD trainer set the
    draw's step to the ``global_step`` it was given: the counter OpenRLHF restores from its checkpoint."""

    class Reached(Exception):
        pass

    class RecordingMaker:
        draw_step = 0
        seen: list[int] = []

        def make_experience_batch(self, rollout_samples):
            self.seen.append(self.draw_step)
            raise Reached  # the rest of OpenRLHF's step needs the model groups

    instance = object.__new__(trainer_class.__ray_actor_class__)
    instance.experience_maker = RecordingMaker()
    for global_step in (7, 0, 3):  # a resumed job's first step is its checkpoint's global step
        with pytest.raises(Reached):
            instance.train_step(["samples"], global_step)
    assert instance.experience_maker.seen == [7, 0, 3]


def test_the_prompt_order_is_a_function_of_the_train_seed(strategy, tmp_path, monkeypatch):
    """OpenRLHF's own prompt loader (``prepare_datasets``, as its trainer and sample generator build it) shuffles
    with a seed drawn from the process's torch RNG: after :func:`seed_prompt_order` the order depends on
    ``--train.seed`` only, not on what the process's RNG held before."""
    import torch
    from openrlhf.trainer.ppo_trainer import prepare_datasets
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    data = tmp_path / "eight.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"}], "label": ""}) for i in range(8)
        )
    )
    strategy.args.data.prompt_dataset = str(data)
    # The single-process loader (the trainer's): another test of this process may have set up torch.distributed.
    monkeypatch.setattr("openrlhf.utils.deepspeed.deepspeed.dist.is_initialized", lambda: False)
    strategy.setup_dataloader = DeepspeedStrategy.setup_dataloader.__get__(strategy)
    student = load_packaged_tokenizer("qwen")

    def order(seed: int, rng_before: int, seeded: bool = True) -> list[str]:
        strategy.args.train.seed = seed
        torch.manual_seed(rng_before)  # whatever the process's RNG held when OpenRLHF built the loader
        if seeded:
            seed_prompt_order(strategy.args)
        loader, _, _ = prepare_datasets(strategy, student)
        return [prompt for _, prompts, _, _ in loader for prompt in prompts]

    first = order(42, rng_before=1)
    assert sorted(first) == sorted(order(42, rng_before=1, seeded=False)) and len(set(first)) == 8
    assert order(42, rng_before=2) == first
    assert order(7, rng_before=1) != first
    assert order(42, rng_before=1, seeded=False) != order(42, rng_before=2, seeded=False)  # OpenRLHF alone
