"""The demo task's reward function, in OpenRLHF's ``--reward.remote_url reward.py`` convention."""

from gold_plugin.demo.task import reward_func

__all__ = ["reward_func"]
