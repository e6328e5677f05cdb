"""`make run`'s seeding: a loadable tiny checkpoint and demo adapters that the store accepts."""

from __future__ import annotations

import pytest
import torch

from bdlora_ray.config import LlamaConfig
from bdlora_ray.store import AdapterStore, StoreConfig
from bdlora_ray.store.s3 import AdapterBucket
from bdlora_ray.tokenizer import load_tokenizer
from deploy.config import AppConfig
from deploy.seed import DEMO_ADAPTERS, TINY, seed_adapters, write_checkpoint


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, s3_server):
    d = tmp_path_factory.mktemp("embedded")
    model = write_checkpoint(d / "tiny-llama")
    uri = f"s3://{s3_server.create_bucket('embedded-adapters')}/adapters"
    names = seed_adapters(model, d / "peft", uri, tp=2)
    return model, uri, names, d


def test_checkpoint_loads_in_hf_transformers_and_here(seeded):
    from transformers import LlamaForCausalLM

    model, *_ = seeded
    hf, info = LlamaForCausalLM.from_pretrained(model, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert next(hf.parameters()).dtype == torch.float32
    cfg = LlamaConfig.from_json(model)
    assert cfg.name == "tiny-llama" and cfg.vocab_size == TINY.vocab_size
    cfg.check_tp(2)
    tok = load_tokenizer(model)
    assert tok.decode(tok.encode("héllo")) == "héllo" and len(tok) <= cfg.vocab_size
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        logits = hf(torch.tensor([tok.encode("hello")])).logits
    assert torch.isfinite(logits).all() and logits.std() > 0.1  # not flat: sampled text varies


def test_demo_adapters_are_in_s3_and_pass_the_stores_validation(seeded):
    model, uri, names, _ = seeded
    assert names == [a.name for a in DEMO_ADAPTERS]
    infos = {i.name: i for i in AdapterBucket(uri).catalog()}
    assert set(infos) == set(names)
    assert {n: (i.mode, i.tp, i.rank, i.error) for n, i in infos.items()} == {
        a.name: (a.mode, 2, a.rank, None) for a in DEMO_ADAPTERS}
    store = AdapterStore(StoreConfig(uri=uri, model=LlamaConfig.from_json(model), tp=2))
    for name in names:
        for rank in range(2):
            blob = store.get_shard(name, rank)  # sha256, shapes and values checked on the way in
            assert all(t.abs().sum() > 0 for t in blob.tensors().values())


def test_bd_demo_adapter_is_block_diagonal_as_peft_loads_it(seeded):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model, _, _, d = seeded
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model), d / "peft" / "demo-bdlora")
    assert peft.peft_config["default"].use_bdlora.nblocks == 2


def test_seeding_keeps_an_existing_checkpoint(seeded, tmp_path):
    model, *_ = seeded
    before = (model / "model.safetensors").stat().st_mtime_ns
    assert write_checkpoint(model) == model
    assert (model / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in model.parent.iterdir() if p.name.startswith(".tiny-llama-")]  # no temp dirs left


def test_defaults_are_the_embedded_setup():
    c = AppConfig.from_env({})
    assert c.embedded.local_s3 and c.embedded.seed_model
    assert (c.group.tp, c.group.use_gpu, c.embedded.host, c.embedded.port) == (3, False, "127.0.0.1", 8000)
    assert (c.embedded.demo_model, c.api.model_name) == ("smollm2", "SmolLM2-135M-Instruct")
    assert c.embedded.ray_temp_dir.startswith("/tmp/")
    configured = AppConfig.from_env({"BDLORA_ADAPTERS_URI": "s3://b/p", "BDLORA_MODEL_PATH": "/m"})
    assert not configured.embedded.local_s3 and not configured.embedded.seed_model


def test_http_front_is_the_python_proxy_unless_haproxy_is_asked_for():
    from deploy.cluster_env import HAPROXY_ENV, PORT_VARS, cluster_env

    assert AppConfig.from_env({}).embedded.http_front == "python" and cluster_env("python") == {}
    assert AppConfig.from_env({"BDLORA_HTTP_FRONT": "haproxy"}).embedded.http_front == "haproxy"
    with pytest.raises(ValueError, match="BDLORA_HTTP_FRONT='nginx'"):
        AppConfig.from_env({"BDLORA_HTTP_FRONT": "nginx"})
    local = cluster_env("haproxy")
    assert {k: local[k] for k in HAPROXY_ENV} == HAPROXY_ENV and local["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    ports = [int(local[v]) for v in PORT_VARS]  # free ones, so two local clusters do not collide
    assert len(set(ports)) == len(ports) and all(p > 1024 for p in ports)
    assert cluster_env("haproxy", local=False) == HAPROXY_ENV


def test_one_group_app_serves_the_api_from_its_group_replica_several_groups_behind_an_ingress():
    from deploy import build_app
    from deploy.app import EngineGroupReplica, ServingGroupReplica

    def layout(env: dict[str, str]) -> tuple[str, list[str]]:
        """The app's ingress deployment and the deployments it binds (its arguments that are apps)."""
        config = AppConfig.from_env({"BDLORA_DEMO_MODEL": "tiny", **env})
        bound = build_app(config)._bound_deployment
        below = [a._bound_deployment.name for a in bound.init_args if hasattr(a, "_bound_deployment")]
        assert config.api_in_group == (bound.name == "EngineGroup")
        return bound.name, below

    # One group: one deployment, the group's replica serving the API (its class the ingress kind).
    assert layout({}) == ("EngineGroup", [])
    assert AppConfig.from_env({}).api_in_group
    one = build_app(AppConfig.from_env({"BDLORA_DEMO_MODEL": "tiny"}))._bound_deployment
    assert issubclass(one.func_or_class, ServingGroupReplica)
    # It holds every HTTP request, as the Ingress did: the larger of the two limits.
    assert one._deployment_config.max_ongoing_requests == 1024
    # Several groups (autoscaling or fixed), more than one ingress replica, or asked for: an Ingress
    # deployment that routes to the groups.
    for env in ({"BDLORA_MAX_GROUPS": "2"}, {"BDLORA_NUM_GROUPS": "3"}, {"BDLORA_INGRESS_REPLICAS": "2"},
                {"BDLORA_INGRESS": "separate"}):
        assert layout(env) == ("Ingress", ["EngineGroup"]), env
    sep = build_app(AppConfig.from_env({"BDLORA_DEMO_MODEL": "tiny", "BDLORA_INGRESS": "separate"}))
    group = next(a._bound_deployment for a in sep._bound_deployment.init_args if hasattr(a, "_bound_deployment"))
    assert group.func_or_class is EngineGroupReplica
    with pytest.raises(ValueError, match="BDLORA_INGRESS='inline'"):
        AppConfig.from_env({"BDLORA_INGRESS": "inline"})
    with pytest.raises(ValueError, match="BDLORA_INGRESS_REPLICAS=0"):
        AppConfig.from_env({"BDLORA_INGRESS_REPLICAS": "0"})
