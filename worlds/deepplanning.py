"""DeepPlanning travel planning as tool-use tasks (paper §7, Table 7: the agentic setting, DeepPlanning travel
planning): each task is a conversation with the benchmark's tools, scored at its end by a rule-based reward.

Data: Qwen-Agent's benchmark/deepplanning/travelplanning folder, with database_en.zip from the Hugging Face dataset
Qwen/DeepPlanning unzipped in its database/ folder: PATH/data/travelplanning_query_en.json and
PATH/database/database_en/id_<n>/<table>/<table>.csv. "train" and "test" are 80 % / 20 % of a seeded shuffle of
the benchmark's one set of tasks. The nine tools keep the benchmark's names and parameters; their results carry the
CSV's own columns (named as in the official tool code; value formats such as "3" stars are assumed). The reward is
the official composite score over the rule-based checks of deepplanning_checks.py.
"""
from __future__ import annotations

import csv
import functools
import json
import random
import re
from pathlib import Path
from typing import Callable

import tip
from worlds.deepplanning_checks import DIMENSIONS, extract_plan, parse_plan, plan_checks
from rollout import Task

SPLIT_SEED = 0
TABLES = {"trains": "trains/trains.csv", "flights": "flights/flights.csv", "hotels": "hotels/hotels.csv",
          "attractions": "attractions/attractions.csv", "restaurants": "restaurants/restaurants.csv",
          "locations": "locations/locations_coords.csv", "routes": "transportation/distance_matrix.csv"}
ATTRACTION_TYPES = ("Historical and Cultural", "Natural Scenery", "Art Exhibition", "City Landmark", "Theme Park",
                    "Leisure Experience")
SYSTEM_PROMPT = """You are a travel planner. The user's request is complete: do not ask questions. First gather facts \
with the tools, then write the whole plan inside <plan></plan>. Every name, time and price must come from a tool \
result, spelled exactly as returned.
Plan format, one block per day:
Day N:
Current City: from A to B (a travel day) or A
Accommodation: Hotel Name, ¥price/room/night (or - on the last day)
then one line per activity, back to back (each starts when the previous one ends):
HH:MM-HH:MM | travel_intercity_public | flight/train NUMBER, Departure Station - Arrival Station, ¥price/person
HH:MM-HH:MM | travel_city | Place A - Place B, distance, duration, ¥price per car (4 people per car)
HH:MM-HH:MM | attraction | Attraction Name, ¥price/person
HH:MM-HH:MM | meal | Lunch/Dinner, Restaurant Name, ¥price/person
HH:MM-HH:MM | hotel | Check-in/Check-out/Rest, Hotel Name
HH:MM-HH:MM | buffer | what happens (waiting, security check, baggage claim)
Rules: the trip starts and ends in the home city; every day but the last ends at the hotel; lunch and dinner on \
full days, at least 2 hours apart, 30-150 minutes each, within opening hours; attraction visits within opening \
hours, on open days, for the recommended number of hours; travel times as the route tool says; no place twice.
End with a budget summary whose last line is "Total Estimated Budget: N RMB": tickets, meals and trains/flights \
per person, rooms per room and night, taxis per car; stay within the user's budget."""


# ---------------------------------------------------------------- one task's database and its tools

class TravelDatabase:
    """One task's CSV tables (id_<n>/), each read on first use; every value stays a string, as written."""
    def __init__(self, folder: Path):
        self.folder, self.tables = Path(folder), {}

    def rows(self, table: str) -> list[dict]:
        if table not in self.tables:
            with open(self.folder / TABLES[table], encoding="utf-8-sig", newline="") as f:
                self.tables[table] = [{k: (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]
        return self.tables[table]

    def find(self, table: str, column: str, value: str) -> dict | None:
        return next((row for row in self.rows(table) if row.get(column) == value), None)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _date(value: str, name: str) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value or ""):
        raise ValueError(f"{name} must be a date written YYYY-MM-DD, got {value!r}")
    return value


def _timetable(db: TravelDatabase, table: str, origin: str, destination: str, date: str, seat_class: str) -> str:
    """Trains or flights of one day as routes (route_index): a transfer route lists its segments in
    segment_index order and costs its first segment's price, as the benchmark reports it."""
    routes = {}
    for row in sorted(db.rows(table), key=lambda r: (int(r["route_index"]), int(r["segment_index"]))):
        if (row["origin_city"], row["destination_city"], row["dep_date"]) == (origin, destination, date) \
                and seat_class in ("", row["seat_class"]):
            segment = {k: v for k, v in row.items() if k not in ("route_index", "segment_index", "price")}
            routes.setdefault(row["route_index"], {"segments": [], "price": float(row["price"] or 0)})
            routes[row["route_index"]]["segments"].append(dict(segment, seat_status=row["seat_status"] or "Available"))
    found = list(routes.values())
    return _json(found) if found else f"No {table[:-1]} information found from {origin} to {destination} on {date}"


def _listed(row: dict, *columns: str) -> dict:
    """A row with its ";"-separated columns (hotel services, restaurant tags) as lists."""
    return {k: [item for item in v.split(";") if item] if k in columns else v for k, v in row.items()}


def travel_tools(db: TravelDatabase) -> list[Callable]:
    """The benchmark's nine tools, bound to one task's database. A query with no answer returns a sentence that
    says so (as the benchmark's tools do); a malformed argument raises, and the model reads the error."""

    def query_train_info(origin: str, destination: str, depDate: str, seatClassName: str = "") -> str:
        """Train tickets between two cities on one day, direct and with a transfer: train number, stations, times,
        duration, seat class, remaining seats, price per person. Use names and numbers exactly as returned.

        Args:
            origin: Departure city name.
            destination: Arrival city name.
            depDate: Departure date, YYYY-MM-DD.
            seatClassName: Optional seat class: First Class Seat, Second Class Seat or Business Seat.
        """
        return _timetable(db, "trains", origin, destination, _date(depDate, "depDate"), seatClassName)

    def query_flight_info(origin: str, destination: str, depDate: str, seatClassName: str = "") -> str:
        """Flights between two cities on one day, direct and connecting: flight number, airports, times, duration,
        seat class, remaining seats, price per person, aircraft. Use names and numbers exactly as returned.

        Args:
            origin: Departure city name.
            destination: Arrival city name.
            depDate: Departure date, YYYY-MM-DD.
            seatClassName: Optional seat class: Economy Class, Business Class or First Class.
        """
        return _timetable(db, "flights", origin, destination, _date(depDate, "depDate"), seatClassName)

    def query_hotel_info(destination: str, checkinDate: str, checkoutDate: str, hotelStar: str = "",
                         hotelBrands: str = "") -> str:
        """Hotels at the destination: name, address, coordinates, stars, price per room and night, score, brand,
        renovation year, services. Use hotel names exactly as returned.

        Args:
            destination: Destination (city, district or county name).
            checkinDate: Check-in date, YYYY-MM-DD.
            checkoutDate: Check-out date, YYYY-MM-DD.
            hotelStar: Optional star rating, a single value from 1 to 5.
            hotelBrands: Optional single brand, e.g. Ji Hotel, Atour Hotel, Marriott, Hilton, Home Inn, Orange Hotel.
        """
        if _date(checkoutDate, "checkoutDate") <= _date(checkinDate, "checkinDate"):
            raise ValueError(f"checkoutDate {checkoutDate} must come after checkinDate {checkinDate}")
        if hotelStar and hotelStar.strip() not in ("1", "2", "3", "4", "5"):
            raise ValueError(f"hotelStar must be one value from 1 to 5, got {hotelStar!r}")
        # as in the benchmark, the destination filters nothing: a task's database holds its destination's hotels
        found = [_listed(r, "services") for r in db.rows("hotels") if hotelBrands in ("", r["brand"])
                 and (not hotelStar or float(r["hotel_star"] or 0) == float(hotelStar))]
        return _json(found) if found else f"No hotel found in {destination}: check the arguments or drop a filter"

    def query_attraction_details(attraction_name: str) -> str:
        """One attraction: city, address, coordinates, description, rating, opening and closing time, closing
        days, recommended visit hours (min_visit_hours, max_visit_hours), ticket price, type.

        Args:
            attraction_name: The attraction's exact name.
        """
        row = db.find("attractions", "attraction_name", attraction_name)
        return _json(row) if row else f"No attraction named {attraction_name!r} in the database"

    def recommend_attractions(city: str, attraction_type: str = "") -> str:
        """A city's popular attractions, optionally of one type: name, description, type. Only attractions
        returned here may appear in the plan, under exactly these names.

        Args:
            city: City name.
            attraction_type: Optional type: Historical and Cultural, Natural Scenery, Art Exhibition,
                City Landmark, Theme Park or Leisure Experience.
        """
        rows = db.rows("attractions")
        if attraction_type and attraction_type not in {*ATTRACTION_TYPES, *(r["attraction_type"] for r in rows)}:
            raise ValueError(f"unknown attraction_type {attraction_type!r}; choose one of "
                             f"{', '.join(ATTRACTION_TYPES)}")
        # as in the benchmark, the city filters nothing: a task's database holds its destination's attractions
        found = [{key: r[key] for key in ("attraction_name", "description", "attraction_type")}
                 for r in rows if attraction_type in ("", r["attraction_type"])]
        return _json(found) if found else f"No attractions found in {city}"

    def search_location(place_name: str) -> str:
        """Latitude and longitude (six decimals) of a place that another tool named.

        Args:
            place_name: The place's exact name: a hotel, attraction, restaurant, station or airport.
        """
        row = db.find("locations", "poi_name", place_name)
        return (_json({"place_name": place_name, "latitude": row["latitude"], "longitude": row["longitude"]}) if row
                else f"No coordinates found for {place_name!r}: use a name exactly as another tool returned it")

    def query_road_route_info(origin: str, destination: str) -> str:
        """Road route between two points: distance in meters, duration in minutes, cost. Up to 2 km it is a walk
        (cost 0), beyond that a taxi, whose cost is per car of up to 4 people.

        Args:
            origin: Start point, "latitude,longitude" with six decimals as search_location returns them.
            destination: End point, "latitude,longitude" with six decimals as search_location returns them.
        """
        for name, value in (("origin", origin), ("destination", destination)):
            if not re.fullmatch(r"-?\d+(\.\d+)?,-?\d+(\.\d+)?", value or ""):
                raise ValueError(f"{name} must be 'latitude,longitude' such as '32.041544,118.784268', got {value!r}")
        row = next((r for r in db.rows("routes") if (r["origin"], r["destination"]) == (origin, destination)), None)
        return _json(row) if row else f"No route found from {origin} to {destination}"

    def recommend_restaurants(latitude: str, longitude: str) -> str:
        """Restaurants near a point: name, coordinates, price per person, cuisine, opening hours, rating, tags.

        Args:
            latitude: Latitude with six decimals, as another tool returned it.
            longitude: Longitude with six decimals, as another tool returned it.
        """
        for name, value in (("latitude", latitude), ("longitude", longitude)):
            if not re.fullmatch(r"-?\d+(\.\d+)?", value or ""):
                raise ValueError(f"{name} must be a decimal number such as 32.041544, got {value!r}")
        found = [_listed(r, "tags") for r in db.rows("restaurants")
                 if (r["query_latitude"], r["query_longitude"]) == (latitude, longitude)]
        return _json(found) if found else f"No restaurants found near ({latitude}, {longitude})"

    def query_restaurant_details(restaurant_name: str) -> str:
        """One restaurant: coordinates, price per person, cuisine, opening and closing time, rating, tags.

        Args:
            restaurant_name: The restaurant's exact name.
        """
        row = db.find("restaurants", "restaurant_name", restaurant_name)
        return _json(_listed(row, "tags")) if row else f"No restaurant named {restaurant_name!r} in the database"

    return [query_train_info, query_flight_info, query_hotel_info, query_attraction_details, recommend_attractions,
            search_location, query_road_route_info, recommend_restaurants, query_restaurant_details]


# ---------------------------------------------------------------- the reward

SCORES = ("delivered", "commonsense", "personalized", "composite", "case_accuracy")


def plan_scores(meta: dict, db: TravelDatabase, conversation: list[dict]) -> dict[str, float]:
    """The official per-task scores of the last assistant message's delivered plan (extract_plan): delivered (1 when
    it holds a closed <plan> block), commonsense (the share of DIMENSIONS whose checks all pass), personalized (1
    iff there are hard constraints and every one holds), composite (their mean) and case_accuracy (1 iff both are
    1). A task with no delivered plan scores 0 on each, as the official averages count it."""
    text = next((m.get("content") or "" for m in reversed(conversation) if m["role"] == "assistant"), "")
    days, total = parse_plan(text)
    if not extract_plan(text) or not days:
        return dict.fromkeys(SCORES, 0.0) | {"delivered": float(bool(extract_plan(text)))}
    checks = plan_checks(meta, db, days, total)
    commonsense = sum(all(checks[name] for name in names) for names in DIMENSIONS.values()) / len(DIMENSIONS)
    hard = [checks[key] for key in meta.get("hard_constraints", {}) if key in checks]
    personalized = float(bool(hard) and all(hard))
    return dict(delivered=1.0, commonsense=commonsense, personalized=personalized,
                composite=(commonsense + personalized) / 2, case_accuracy=float(commonsense == personalized == 1.0))


def deepplanning_reward(meta: dict, db: TravelDatabase, conversation: list[dict]) -> float:
    """A conversation's reward: the official composite score of its plan (plan_scores)."""
    return plan_scores(meta, db, conversation)["composite"]


# ---------------------------------------------------------------- tasks and splits

def deepplanning_tasks(path: str, split: str, language: str = "en") -> list[Task]:
    """The tasks of a split ("train": 80 % of a seeded shuffle of the task ids, "test": the other 20 %, "all":
    every task, in the benchmark's order), each with the benchmark's opening messages, tools bound to its own
    database, its reward and its official scores."""
    if split not in ("train", "test", "all"):
        raise tip.InputError(f"unknown DeepPlanning split {split!r}: choose train, test or all")
    root = Path(path)
    queries = root / "data" / f"travelplanning_query_{language}.json"
    databases = root / "database" / f"database_{language}"
    expected = (f"expected the benchmark's travelplanning folder (Qwen-Agent benchmark/deepplanning/travelplanning) "
                f"holding data/travelplanning_query_{language}.json and database/database_{language}/id_<n>/ "
                f"(unzip database_{language}.zip from the Hugging Face dataset Qwen/DeepPlanning in database/)")
    if not root.is_dir():
        raise tip.InputError(f"DeepPlanning folder {path!r} does not exist; {expected}")
    if not queries.is_file():
        raise tip.InputError(f"{queries} is missing; {expected}")
    try:
        samples = json.loads(queries.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise tip.InputError(f"{queries} is not valid JSON ({error}); {expected}") from None
    if not isinstance(samples, list) or not all(isinstance(s, dict) and {"id", "query", "meta_info"} <= s.keys()
                                                for s in samples):
        raise tip.InputError(f"{queries} is not a list of tasks with id, query and meta_info; {expected}")
    for sample in samples:
        folder = databases / f"id_{sample['id']}"
        if missing := [table for table in TABLES.values() if not (folder / table).is_file()]:
            raise tip.InputError(f"task {sample['id']}: {folder} lacks {', '.join(missing)}; {expected}")
    order = sorted(samples, key=lambda s: str(s["id"]).zfill(9))  # the benchmark's order, then a fixed shuffle
    shuffled = order.copy()
    random.Random(SPLIT_SEED).shuffle(shuffled)
    cut = len(shuffled) * 4 // 5
    tasks = []
    for sample in dict(train=shuffled[:cut], test=shuffled[cut:], all=order)[split]:
        db = TravelDatabase(databases / f"id_{sample['id']}")
        tasks.append(Task([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": sample["query"]}],
                          travel_tools(db), functools.partial(deepplanning_reward, sample["meta_info"], db),
                          functools.partial(plan_scores, sample["meta_info"], db)))
    return tasks
