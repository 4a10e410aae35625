#!/usr/bin/env python3
"""Parses an OpenMetrics exposition (stdin) with the prometheus-client library's strict parser,
the one Prometheus' own text format follows, and prints its families as JSON:
[{"name", "type", "samples": [{"name", "labels", "value"}]}]. Exits 1 with the parser's
complaint if the text is not valid OpenMetrics."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    try:
        families = [
            {
                "name": family.name,
                "type": family.type,
                "samples": [
                    {"name": s.name, "labels": s.labels, "value": s.value} for s in family.samples
                ],
            }
            for family in text_string_to_metric_families(text)
        ]
    except Exception as e:  # the parser raises ValueError and friends
        print(f"not valid OpenMetrics: {e}", file=sys.stderr)
        return 1
    json.dump(families, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
