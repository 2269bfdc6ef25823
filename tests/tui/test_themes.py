"""Theme files: the shipped ones load, user themes are found in the config dir, unknown names are errors."""

from __future__ import annotations

import pytest

from sedac_core.config import SedacConfig
from sedac_core.errors import ConfigError
from sedac_tui.app import SedacChatApp, available_themes, load_theme_file, resolve_theme, THEMES_DIR

from .helpers import scripted_app


def test_shipped_themes_load_with_panel_colours():
    names = available_themes()
    assert names[:3] == sorted(["sedac-dark", "sedac-high-contrast", "sedac-light"])
    assert "textual-dark" in names
    for path in THEMES_DIR.glob("*.yaml"):
        theme = load_theme_file(path)
        assert theme.variables["sedac-easy"] and theme.variables["sedac-hard"]


def test_user_theme_from_xdg_config_dir(tmp_path):
    themes = tmp_path / "config" / "sedac-chat" / "themes"
    themes.mkdir(parents=True)
    (themes / "mine.yaml").write_text("name: my-theme\nprimary: '#ff8800'\ndark: true\n")
    assert "my-theme" in available_themes()
    assert resolve_theme("my-theme") == "my-theme"


def test_unknown_theme_lists_the_available_ones():
    with pytest.raises(ConfigError) as err:
        resolve_theme("nope")
    assert "unknown theme 'nope'" in str(err.value) and "sedac-high-contrast" in str(err.value)
    with pytest.raises(ConfigError):
        SedacChatApp(config=SedacConfig(), engine_factory=lambda bus, progress: None, theme="nope")


def test_broken_user_theme_is_an_error_only_when_chosen(tmp_path):
    themes = tmp_path / "config" / "sedac-chat" / "themes"
    themes.mkdir(parents=True)
    (themes / "broken.yaml").write_text("primary: '#fff'\ncolour: red\n")
    assert "broken" not in available_themes()
    with pytest.raises(ConfigError, match="unknown keys colour"):
        resolve_theme("broken")


async def test_theme_option_applies_and_panels_use_its_colours():
    app, _ = scripted_app(theme="sedac-high-contrast")
    async with app.run_test() as pilot:
        await pilot.pause()
        assert app.theme == "sedac-high-contrast"
        assert app.theme_variables["sedac-easy"].lower() == "#00ff00"
        app.theme = "textual-light"  # a built-in theme falls back to the default panel colours
        await pilot.pause()
        assert app.theme_variables["sedac-easy"] == "#4EBF71"


async def test_theme_choice_is_saved_to_the_user_config(tmp_path):
    app, _ = scripted_app()
    async with app.run_test() as pilot:
        await pilot.press("escape", "ctrl+t", "ctrl+s")
        await pilot.pause()
        chosen = app.theme
    assert chosen != "sedac-dark"
    saved = SedacConfig.load(tmp_path / "config" / "sedac-chat" / "config.yaml")
    assert saved.tui.theme == chosen
