"""Functions of the local lmms-eval tasks over the synthetic benchmark (the YAML files beside this)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    # the LLaVA-JSON question without its "<image>\n": the model puts the image first, as tpkit evaluate
    return doc["question"]


def exist_docs(dataset):
    return dataset.filter(lambda doc: doc["qtype"] == "exist")
