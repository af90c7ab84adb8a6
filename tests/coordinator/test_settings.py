"""The run configuration's task section: presets, overrides, your own task, and old keys."""

from __future__ import annotations

import pytest

from coordinator.model.presets import TASK_PRESETS
from coordinator.settings import RunConfig, TaskSettings
from shared.config import load_config
from shared.errors import ConfigError


def test_presets_resolve_and_overrides_win():
    assert RunConfig().task.spec() == TASK_PRESETS["rotten_tomatoes"]
    gsm = TaskSettings(preset="gsm_symbolic", metric="rougeL", max_new_tokens=64).spec()
    assert (gsm.kind, gsm.metric, gsm.max_new_tokens, gsm.normalizer) == ("generation", "rougeL", 64, "last_number")
    mcq = TaskSettings(preset="medmcqa").spec()
    assert mcq.kind == "multiple_choice" and "{options}" in mcq.prompt_template


def test_your_own_task_from_a_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[task]\npreset = ""\nkind = "classification"\nprompt_template = "Ticket: {body}\\nTeam:"\n'
        'answer_field = "team"\nlabel_words = { billing = "billing", outage = "operations", other = "support" }\n'
        'metric = "macro_f1"\nname = "helpdesk"\n'
    )
    task = load_config(RunConfig, path, env={}).task.spec()
    assert task.name == "helpdesk" and task.metric == "macro_f1" and task.row_fields() == ("body", "team")
    assert task.example({"body": "the site is down", "team": "outage"}).answer == " operations"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('[task]\npreset = "squad"\n', "unknown task preset 'squad'"),
        ('[task]\npreset = ""\nkind = "generation"\nmetric = "accuracy"\n', "does not judge a generation task"),
        ('[task]\nprompt_template = "{text.__dict__}"\n', "plain {field} names"),
        ('[evaluation]\ntask = "imdb"\n', r"evaluation\.task: unknown key .*\[task\] preset"),
        ("[evaluation]\nconfidence = 1.5\n", "evaluation.confidence"),
    ],
)
def test_a_bad_task_section_is_a_config_error_at_load(tmp_path, section, message):
    path = tmp_path / "run.toml"
    path.write_text(section)
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, path, env={})
