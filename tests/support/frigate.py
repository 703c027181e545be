"""Frigate 0.18's review request, shared by the server tests and the NPU same-text test: its
ReviewMetadata schema (DESIGN §10), the response_format its openai provider sends, a prompt shaped
like its review prompt, and the shipped coffee photo it is asked about."""

from __future__ import annotations

# Frigate 0.18's ReviewMetadata as its openai provider sends it (pydantic's model_json_schema, closed).
FRIGATE = {
    "type": "object",
    "title": "ReviewMetadata",
    "properties": {
        "title": {"type": "string", "title": "Title", "maxLength": 80,
                  "description": "A concise title for the activity, e.g. 'Person taking out trash'"},
        "scene": {"type": "string", "title": "Scene", "minLength": 150, "maxLength": 600,
                  "description": "What happens across the sequence, from start to finish"},
        "shortSummary": {"type": "string", "title": "Shortsummary", "minLength": 70, "maxLength": 140,
                         "description": "One sentence for a notification"},
        "confidence": {"type": "number", "title": "Confidence", "minimum": 0, "maximum": 1},
        "potential_threat_level": {"type": "integer", "title": "Potential Threat Level", "minimum": 0,
                                   "maximum": 2},
        "observations": {"type": "array", "title": "Observations", "minItems": 3, "maxItems": 8,
                         "items": {"type": "string", "minLength": 20, "maxLength": 200}},
    },
    "required": ["title", "scene", "shortSummary", "confidence", "potential_threat_level", "observations"],
    "additionalProperties": False,
}
FRIGATE_FORMAT = {"type": "json_schema", "json_schema": {"name": "review_metadata", "strict": True,
                                                         "schema": FRIGATE}}


# Frigate's review prompt, as long and as shaped as 0.18's (its own words are not copied here): the
# camera, the time, the activity context, the threat levels, the fields and their rules.
FRIGATE_PROMPT = """Please analyze the sequence of images from the front_door security camera, taken in order \
between 18:02:11 and 18:02:47 on Monday. The images show the activity that Frigate recorded as one review item.

## Normal activity at this location
- Residents, guests and delivery drivers walk to and from the front door during the day and the evening.
- Cars park in the driveway; pets and wild animals cross the yard.
- Neighbours walk past on the sidewalk.

## Your task
Describe what happens across the whole sequence, from the first image to the last: the setting, every person,
vehicle or animal that appears, what each one does and where it goes. Base every statement on what is visible;
say when something is uncertain. Then judge whether the activity is typical for this location and time.

## Threat levels
- 0: typical or expected activity (residents, guests, deliveries, animals), even when someone looks around.
- 1: unusual or suspicious activity: a behaviour that matters for security and that a normal residential
  activity does not explain (testing door handles, looking into windows at night, loitering).
- 2: an active or immediate threat: breaking in, vandalism, aggression, a weapon.

## Fields
- title: a concise title for the activity, at most 80 characters, no camera name, no time.
- scene: a narrative of the sequence, 150 to 600 characters.
- shortSummary: one sentence of 70 to 140 characters for a phone notification.
- observations: 3 to 8 short, distinct facts, each 20 to 200 characters.
- confidence: from 0 to 1, how sure you are of this analysis.
- potential_threat_level: 0, 1 or 2 as defined above.

Answer with one JSON object with exactly these fields and nothing else."""

def coffee_photo() -> bytes:
    from rksmolvlm.calibration.vision_set import shipped_images_dir

    return (shipped_images_dir() / "photo_coffee_cup_table.jpg").read_bytes()
