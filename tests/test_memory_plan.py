"""benchmarks/memory_plan.py at a shrunk shape: one JSON line per combination, LoRA below full
fine-tuning, and its table written into its own section of a results file."""
import json

from conftest import run_python


def test_memory_plan_compiles_every_step_and_writes_its_section(tmp_path):
  results = tmp_path / "RESULTS.md"
  results.write_text("# Benchmark results\n\n## Peers\n\nkept as is\n\n## Memory plan\n\nold\n\n"
                     "## GPU\n\nkept too\n")
  out = run_python(["benchmarks/memory_plan.py", "--models", "tiny", "--presets", "fsdp_tensor",
                    "--remat", "off", "--shrink", "--batch", "4", "--prompt", "8",
                    "--response", "8", "--results", str(results)], timeout=300)
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [(r["step"], r["lora_rank"]) for r in rows] == [("dpo", 0), ("dpo", 16), ("ppo", 0),
                                                         ("ppo", 16)]
  for r in rows:
    assert r["mesh"] == {"fsdp": 4, "tensor": 2} and r["temp_bytes"] > 0
    assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                                + r["temp_bytes"] + r["generated_code_bytes"])
  for full, lora in (rows[:2], rows[2:]):
    # Full fine-tuning's arguments hold params + 2 Adam moments (+ the DPO reference), each
    # sharded over 8 devices (a little is replicated); LoRA's hold the base once plus small
    # adapters.
    assert 3 * 4 * full["params"] / 8 < full["argument_bytes"] < 5 * 4 * full["params"] / 8 * 1.5
    assert lora["trainable_params"] < full["params"] / 4
    assert lora["total_bytes"] < full["total_bytes"]
  text = results.read_text()
  assert "## Peers\n\nkept as is\n" in text and text.rstrip().endswith("## GPU\n\nkept too")
  assert "old" not in text and text.count("## Memory plan") == 1
  assert "| tiny(shrunk) | dpo | fsdp_tensor | off |" in text
