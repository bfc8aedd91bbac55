"""Small files the data tests write: a solid-colour PNG and a JSON document."""
import json

from PIL import Image


def png(path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path
