"""A realistic synthetic Uzbek data set: patients, practitioners, organizations, encounters, observations.

- Names in Uzbek Latin (with the oʻ/gʻ letters) and the same name in Cyrillic as a second HumanName.
- PINFL (14 digits: century/sex digit, birth date DDMMYY, district, serial, check digit) as the national id.
- Coded addresses: ``city`` = a mahalla code from mahalla-cs, ``district`` from regions-cs, ``state`` its region.
- Encounters at organizations, observations with LOINC codes, realistic value ranges and UCUM units.

Deterministic for a seed. ``python benchmarks/synthetic.py --patients 10`` prints a sample as NDJSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

PINFL = "https://dpm.uz/identifier/national-unique-id"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
MAHALLA_CS = "https://terminology.dhp.uz/fhir/core/CodeSystem/mahalla-cs"
REGIONS_CS = "https://terminology.dhp.uz/fhir/core/CodeSystem/regions-cs"
STATE_CS = "https://terminology.dhp.uz/fhir/core/CodeSystem/state-cs"

# (Latin, Cyrillic)
MALE_GIVEN = [
    ("Alisher", "Алишер"), ("Bahodir", "Баҳодир"), ("Dilshod", "Дилшод"), ("Jasur", "Жасур"),
    ("Otabek", "Отабек"), ("Sardor", "Сардор"), ("Shavkat", "Шавкат"), ("Ulugʻbek", "Улуғбек"),
    ("Rustam", "Рустам"), ("Jamshid", "Жамшид"), ("Sherzod", "Шерзод"), ("Akmal", "Акмал"),
    ("Gʻayrat", "Ғайрат"), ("Oʻtkir", "Ўткир"), ("Temur", "Темур"), ("Farhod", "Фарҳод"),
    ("Nodir", "Нодир"), ("Zafar", "Зафар"), ("Ibrohim", "Иброҳим"), ("Sanjar", "Санжар"),
]
FEMALE_GIVEN = [
    ("Dilnoza", "Дилноза"), ("Gulnora", "Гулнора"), ("Madina", "Мадина"), ("Nodira", "Нодира"),
    ("Oʻgʻiloy", "Ўғилой"), ("Shahnoza", "Шаҳноза"), ("Zulfiya", "Зулфия"), ("Malika", "Малика"),
    ("Feruza", "Феруза"), ("Kamola", "Камола"), ("Sevara", "Севара"), ("Nilufar", "Нилуфар"),
    ("Mohira", "Моҳира"), ("Barno", "Барно"), ("Yulduz", "Юлдуз"), ("Gʻuncha", "Ғунча"),
]
FAMILY = [
    ("Karimov", "Каримов"), ("Rahimov", "Раҳимов"), ("Toʻxtayev", "Тўхтаев"), ("Yusupov", "Юсупов"),
    ("Qodirov", "Қодиров"), ("Ergashev", "Эргашев"), ("Saidov", "Саидов"), ("Nazarov", "Назаров"),
    ("Xoʻjayev", "Хўжаев"), ("Abdullayev", "Абдуллаев"), ("Mirzayev", "Мирзаев"), ("Tursunov", "Турсунов"),
    ("Gʻulomov", "Ғуломов"), ("Ismoilov", "Исмоилов"), ("Hasanov", "Ҳасанов"), ("Sobirov", "Собиров"),
    ("Umarov", "Умаров"), ("Oripov", "Орипов"), ("Jurayev", "Жураев"), ("Sultonov", "Султонов"),
    ("Normatov", "Норматов"), ("Qosimov", "Қосимов"), ("Boboyev", "Бобоев"), ("Shodmonov", "Шодмонов"),
]

# LOINC code, display, unit, low, high, decimals
VITALS = [
    ("8867-4", "Heart rate", "/min", 50, 120, 0),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 95, 180, 0),
    ("8462-4", "Diastolic blood pressure", "mm[Hg]", 55, 110, 0),
    ("8310-5", "Body temperature", "Cel", 35.8, 39.5, 1),
    ("29463-7", "Body weight", "kg", 3, 120, 1),
    ("8302-2", "Body height", "cm", 50, 200, 0),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 60, 250, 0),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 8, 18, 1),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 120, 300, 0),
    ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", 85, 100, 0),
    ("9279-1", "Respiratory rate", "/min", 10, 30, 0),
    ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 15, 40, 1),
]
GENDER_DIGIT = {("male", 19): "3", ("female", 19): "4", ("male", 20): "5", ("female", 20): "6"}


def _package_dir(pkg: str) -> Path | None:
    base = Path.home() / ".fhir" / "packages"
    for d in sorted(base.glob(f"{pkg}#*"), reverse=True):
        if (d / "package").is_dir():
            return d / "package"
    return None


def load_codes() -> tuple[list[str], dict[str, list[str]]]:
    """Mahalla codes and district codes by region prefix, read from the uz.dhp.core package."""
    pkg = _package_dir("uz.dhp.core")
    mahallas: list[str] = []
    districts: dict[str, list[str]] = {}
    if pkg is not None:
        for name, out in (("CodeSystem-mahalla-cs.json", None), ("CodeSystem-regions-cs.json", districts)):
            f = pkg / name
            if not f.exists():
                continue
            cs = json.loads(f.read_text())

            def walk(concepts: list[dict[str, Any]], out: dict[str, list[str]] | None = out) -> None:
                for c in concepts:
                    code = str(c.get("code", ""))
                    if out is None:
                        mahallas.append(code)
                    else:
                        out.setdefault(code[:4], []).append(code)
                    walk(c.get("concept") or [], out)

            walk(cs.get("concept") or [])
    if not mahallas:  # the package is missing: still produce well-formed codes
        mahallas = [f"1726{i:04d}" for i in range(1, 500)]
    return mahallas, districts


def pinfl(rng: random.Random, gender: str, born: date, serial: int) -> str:
    century = 19 if born.year < 2000 else 20
    body = (GENDER_DIGIT[(gender, century)] + born.strftime("%d%m%y") + f"{rng.randint(100, 999)}"
            + f"{serial % 1000:03d}")
    weights = [7, 3, 1] * 5
    check = sum(int(d) * w for d, w in zip(body, weights, strict=False)) % 10
    return body + str(check)


@dataclass
class Sizes:
    patients: int
    encounters_per_patient: int = 2
    observations_per_patient: int = 10
    organizations: int = 100
    practitioners: int = 300


class Generator:
    def __init__(self, sizes: Sizes, seed: int = 42) -> None:
        self.sizes = sizes
        self.rng = random.Random(seed)
        self.mahallas, self.districts = load_codes()
        self.patient_ids: list[str] = []
        self.pinfls: list[str] = []

    def organizations(self) -> Iterator[dict[str, Any]]:
        for i in range(self.sizes.organizations):
            m = self.rng.choice(self.mahallas)
            yield {"resourceType": "Organization", "id": f"org-{i}", "active": True,
                   "identifier": [{"system": "https://soliq.uz", "value": f"{300000000 + i}"}],
                   "name": f"{i + 1}-son oilaviy poliklinika",
                   "contact": [{"address": {"city": m, "state": m[:4], "country": "UZ"}}]}

    def practitioners(self) -> Iterator[dict[str, Any]]:
        for i in range(self.sizes.practitioners):
            g = self.rng.choice(["male", "female"])
            given = self.rng.choice(MALE_GIVEN if g == "male" else FEMALE_GIVEN)
            fam = self.rng.choice(FAMILY)
            suffix = "a" if g == "female" else ""
            yield {"resourceType": "Practitioner", "id": f"doc-{i}", "active": True, "gender": g,
                   "identifier": [{"system": PINFL, "value": f"{20000000000000 + i}"}],
                   "name": [{"use": "official", "family": fam[0] + suffix, "given": [given[0]]}]}

    def patient(self, i: int) -> dict[str, Any]:
        rng = self.rng
        g = rng.choice(["male", "female"])
        given = rng.choice(MALE_GIVEN if g == "male" else FEMALE_GIVEN)
        fam = rng.choice(FAMILY)
        lat_f, cyr_f = (fam[0] + "a", fam[1] + "а") if g == "female" else fam
        born = date(1940, 1, 1) + timedelta(days=rng.randint(0, 365 * 84))
        code = pinfl(rng, g, born, i)
        self.patient_ids.append(f"pat-{i}")
        self.pinfls.append(code)
        m = rng.choice(self.mahallas)
        region = m[:4]
        district = rng.choice(self.districts.get(region) or [region + "200"])
        return {
            "resourceType": "Patient", "id": f"pat-{i}", "active": True, "gender": g,
            "birthDate": born.isoformat(),
            "identifier": [{"use": "official", "system": PINFL, "value": code,
                            "type": {"coding": [{"system": V2_0203, "code": "NI"}]}}],
            "name": [{"use": "official", "family": lat_f, "given": [given[0]]},
                     {"use": "usual", "family": cyr_f, "given": [given[1]], "text": f"{cyr_f} {given[1]}"}],
            "telecom": [{"system": "phone", "value": f"+99890{rng.randint(1000000, 9999999)}"}],
            "address": [{"use": "home", "country": "UZ", "state": region, "district": district, "city": m,
                         "line": [f"{rng.randint(1, 120)}-uy"]}],
            "managingOrganization": {"reference": f"Organization/org-{rng.randrange(self.sizes.organizations)}"},
            "generalPractitioner": [{"reference": f"Practitioner/doc-{rng.randrange(self.sizes.practitioners)}"}],
        }

    def clinical(self, i: int) -> Iterator[dict[str, Any]]:
        rng = self.rng
        pid = f"pat-{i}"
        encs = []
        for e in range(self.sizes.encounters_per_patient):
            start = datetime(2021, 1, 1, tzinfo=UTC) + timedelta(minutes=rng.randint(0, 60 * 24 * 365 * 4))
            end = start + timedelta(minutes=rng.randint(10, 240))
            eid = f"enc-{i}-{e}"
            encs.append((eid, start))
            yield {"resourceType": "Encounter", "id": eid, "status": "completed",
                   "class": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                          "code": "AMB"}]}],
                   "subject": {"reference": f"Patient/{pid}"},
                   "serviceProvider": {"reference": f"Organization/org-{rng.randrange(self.sizes.organizations)}"},
                   "participant": [{"actor": {"reference":
                                              f"Practitioner/doc-{rng.randrange(self.sizes.practitioners)}"}}],
                   "actualPeriod": {"start": _iso(start), "end": _iso(end)}}
        for o in range(self.sizes.observations_per_patient):
            code, display, unit, lo, hi, dec = rng.choice(VITALS)
            eid, start = rng.choice(encs) if encs else (None, datetime(2023, 1, 1, tzinfo=UTC))
            when = start + timedelta(minutes=rng.randint(0, 30))
            value = round(rng.uniform(lo, hi), dec) if dec else rng.randint(int(lo), int(hi))
            obs: dict[str, Any] = {
                "resourceType": "Observation", "id": f"obs-{i}-{o}", "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "vital-signs" if code not in ("2339-0", "718-7", "2093-3")
                                          else "laboratory"}]}],
                "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
                "subject": {"reference": f"Patient/{pid}"},
                "effectiveDateTime": _iso(when),
                "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
            }
            if eid:
                obs["encounter"] = {"reference": f"Encounter/{eid}"}
            yield obs


def _iso(d: datetime) -> str:
    return d.strftime("%Y-%m-%dT%H:%M:%SZ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=10)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    gen = Generator(Sizes(args.patients), args.seed)
    for r in [*gen.organizations(), *gen.practitioners()][:5]:
        sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
    for i in range(args.patients):
        sys.stdout.write(json.dumps(gen.patient(i), ensure_ascii=False) + "\n")
        for r in gen.clinical(i):
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
