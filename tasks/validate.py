from prefect import task

from wdsembed.config import EmbedConfig
from wdsembed.validate import validate_output


class ValidationFailed(ValueError):
    pass


def validate_one_shard(config: EmbedConfig, result: dict) -> dict:
    """Re-read a shard's output: row count, dimension, finite values, norms. Fails the task, naming the shard."""
    check = validate_output(
        config, result["output"], dim=result["dim"], expected_rows=result["rows"],
        expected_embedded=result["embedded"],
    )
    if not check.ok:
        raise ValidationFailed(f"shard {result['shard']}: " + "; ".join(check.problems))
    return result


validate_shard = task(name="validate-shard", task_run_name="validate-{result[stem]}")(validate_one_shard)
