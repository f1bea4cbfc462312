"""Hostile config texts, each with the words its refusal must hold: the CLI reads them as a
--config file (test_error_boundary.py: exit 2, '(file)' named), the HTTP API as a request body
(test_api.py: a 4xx naming '(body)' or the field). Standard library only: the WebUI-side venvs
have no torch."""
from __future__ import annotations


def deep(n):
    return "[" * n + "]" * n


def config_text_cases():
    big = "9" * 5000
    c = [
        ("latin1", "caf\xe9".encode("latin-1"), ["--config", "UTF-8"]),
        ("cp1252_quote", b'{"model_name": "\x93x\x94"}', ["--config", "UTF-8"]),
        ("utf16_no_bom_bytes", '{"a": 1}'.encode("utf-16-le"), ["(file)"]),
        ("binary", bytes(range(256)), ["--config"]),
        ("5000_digit_int", f'{{"steps_per_image": {big}}}'.encode(), ["(file)"]),
        ("5000_digit_float_field", f'{{"learning_rate": {big}}}'.encode(), ["(file)"]),
        ("5000_digit_in_concept", f'{{"concepts": [{{"class_images_per_instance": {big}}}]}}'
         .encode(), ["(file)"]),
        ("nesting_100000", f'{{"model_name": {deep(100000)}}}'.encode(), ["(file)"]),
        ("nesting_top", deep(100000).encode(), ["(file)"]),
        ("schema_minus_1", b'{"schema_version": -1}', ["schema_version"]),
        ("schema_text", b'{"schema_version": "1"}', ["schema_version"]),
        ("schema_float", b'{"schema_version": 1.5}', ["schema_version"]),
        ("schema_bool", b'{"schema_version": true}', ["schema_version"]),
        ("schema_99", b'{"schema_version": 99}', ["schema_version", "newer"]),
        ("schema_huge", f'{{"schema_version": -{"9" * 400}}}'.encode(), ["schema_version"]),
        ("warmup_10e400", f'{{"lr_warmup_steps": 1{"0" * 400}}}'.encode(), ["lr_warmup_steps"]),
        ("save_every_huge", f'{{"save_every_epochs": 1{"0" * 300}}}'.encode(),
         ["save_every_epochs"]),
        ("lr_int_1e400", f'{{"learning_rate": 1{"0" * 400}}}'.encode(), ["learning_rate"]),
        ("lr_float_1e400", b'{"learning_rate": 1e400}', ["learning_rate"]),
        ("lr_nan", b'{"learning_rate": NaN}', ["learning_rate"]),
        ("lr_neg_inf", b'{"learning_rate": -Infinity}', ["learning_rate"]),
        ("seed_negative_huge", f'{{"seed": -{"9" * 300}}}'.encode(), ["seed"]),
        ("name_surrogate", b'{"model_name": "a\\ud800b"}', ["model_name"]),
        ("prompt_surrogate", b'{"concepts": [{"instance_data_dir": "x", "instance_prompt": '
         b'"\\udcff"}]}', ["instance_prompt"]),
        ("class_prompt_surrogate", b'{"concepts": [{"instance_data_dir": "x", "instance_prompt"'
         b': "a", "class_prompt": "\\ud834"}]}', ["class_prompt"]),
        ("name_nul", b'{"model_name": "a\\u0000b"}', ["model_name"]),
        ("work_dir_nul", b'{"work_dir": "a\\u0000b"}', ["work_dir", "NUL"]),
        ("output_dir_nul", b'{"output_dir": "/tmp/a\\u0000b"}', ["output_dir", "NUL"]),
        ("lora_dir_nul", b'{"lora_dir": "a\\u0000"}', ["lora_dir", "NUL"]),
        ("source_nul", b'{"source_checkpoint": "m\\u0000.safetensors"}', ["source_checkpoint"]),
        ("resume_nul", b'{"resume": "st\\u0000ate"}', ["resume"]),
        ("instance_dir_nul", b'{"concepts": [{"instance_data_dir": "a\\u0000", '
         b'"instance_prompt": "x"}]}', ["instance_data_dir"]),
        ("work_dir_surrogate", b'{"work_dir": "\\udc80runs"}', ["work_dir"]),
        ("resume_surrogate", b'{"resume": "\\udc80"}', ["resume"]),
        ("concepts_deep_list", b'{"concepts": [[[[[]]]]]}', ["concepts[0]"]),
        ("concept_null", b'{"concepts": [null]}', ["concepts[0]"]),
        ("name_280_bytes", ('{"model_name": "%s"}' % ("\U0001F600" * 70)).encode(),
         ["model_name", "bytes"]),
        ("work_dir_300_byte_name", ('{"work_dir": "runs/%s"}' % ("x" * 300)).encode(),
         ["work_dir", "255 bytes"]),
        ("work_dir_4200_bytes", ('{"work_dir": "%s"}' % ("ab/" * 1400)).encode(),
         ["work_dir", "4095 bytes"]),
        ("instance_dir_300_byte_name", ('{"concepts": [{"instance_data_dir": "%s", '
                                        '"instance_prompt": "x"}]}' % ("i" * 300)).encode(),
         ["instance_data_dir", "255 bytes"]),
        ("empty_file", b"", ["(file)"]),
        ("bom_only", b"\xef\xbb\xbf", ["(file)"]),
    ]
    return c


def body_cases():
    """The config texts as request bodies, and what the API must name instead of the CLI's
    '(file)' / '--config' (an empty body is the empty object there: no words to hold)."""
    def as_body(words):
        return [{"(file)": "(body)", "--config": "(body)"}.get(w, w) for w in words]
    return [(name, data, [] if name == "empty_file" else as_body(words))
            for name, data, words in config_text_cases()]
