"""Getting TCP segments: from capture files, live interfaces, Docker discovery."""
