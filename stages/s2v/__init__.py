"""Wan2.2 S2V-14B: the speech-to-video model, its audio features and its clip loop."""
