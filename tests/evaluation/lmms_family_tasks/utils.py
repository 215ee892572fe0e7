"""Functions of the local lmms-eval tasks that send several images, a video or no visual per request
(the YAML files beside this; tests/evaluation/test_lmms_families.py writes their datasets)."""


def doc_to_images(doc):
    return [im.convert("RGB") for im in doc["images"]]


def doc_to_video(doc):
    return [doc["video"]]  # a file path, as lmms-eval's video tasks hand them


def doc_to_nothing(doc):
    return []


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return list(doc["choices"])
