"""Print a pytest JUnit XML file's counts as 'N passed, N skipped, N failed, N errors (N tests)'."""

import sys
import xml.etree.ElementTree as ET


def main(path: str) -> None:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed, errors = int(suite.get("failures", 0)), int(suite.get("errors", 0))
    print(f"{tests - skipped - failed - errors} passed, {skipped} skipped, {failed} failed, {errors} errors "
          f"({tests} tests)")


if __name__ == "__main__":
    main(sys.argv[1])
