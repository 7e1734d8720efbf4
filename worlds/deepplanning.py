"""DeepPlanning travel planning as tool-use tasks (paper §7, Table 7: the agentic setting, DeepPlanning travel
planning): each task is a conversation with the benchmark's tools, scored at its end by a rule-based reward.

Data: Qwen-Agent's benchmark/deepplanning/travelplanning folder, with database_en.zip from the Hugging Face dataset
Qwen/DeepPlanning unzipped in its database/ folder: PATH/data/travelplanning_query_en.json and
PATH/database/database_en/id_<n>/<table>/<table>.csv. "train" and "test" are 80 % / 20 % of a seeded shuffle of
the benchmark's one set of tasks. The nine tools, answering as the benchmark's own, are deepplanning_tools.py;
SYSTEM_PROMPT states the official prompt's rules and plan format (agent/prompts.py) in its own words. The reward
is the official composite score over the rule-based checks of deepplanning_checks.py.
"""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import tip
from rollout import Task
from worlds.deepplanning_checks import DIMENSIONS, extract_plan, parse_plan, plan_checks
from worlds.deepplanning_tools import TABLES, TravelDatabase, travel_tools

SPLIT_SEED = 0
SYSTEM_PROMPT = """You are an expert travel planner. Your job is a complete, workable and carefully reasoned itinerary \
for the trip the user asks for. The request already says everything the user wants: never ask a question and never \
ask the user to confirm anything.

Work in two stages:
1. Research. Call the tools for everything the plan needs: trains or flights, hotels, attractions, restaurants, \
coordinates, road routes, and their prices.
2. Planning. Once you know enough, write the whole plan between <plan> and </plan>, keeping to the format and the \
rules below.

WHERE FACTS COME FROM
- Every fact in the plan comes from a tool result. Invent, guess or borrow nothing; trust what the tools return.
- Attractions come from recommend_attractions (one it never returned must not appear), hotels from \
query_hotel_info, restaurants from recommend_restaurants, trains and flights from query_train_info and \
query_flight_info, walks and taxi rides from query_road_route_info.
- Write every name exactly as the tool wrote it, with nothing shortened, renamed or added: if a tool says "Xuanwu \
Lake Park", write "Xuanwu Lake Park", not "Xuanwu Lake"; other tools only find a place by its exact name.

PLAN FORMAT
The plan is a list of days. Each day opens with three header lines:
Day N:
Current City: from A to B (on a day that travels between cities) or A (on a day spent in one city)
Accommodation: Hotel Name, ¥price/room/night (on the last day, which has no hotel: Accommodation: -)
Then come the day's activities in time order, one per line, each "HH:MM-HH:MM | type | details" in one of six forms:
HH:MM-HH:MM | travel_intercity_public | train or flight NUMBER, Departure Station - Arrival Station, ¥price/person
HH:MM-HH:MM | travel_city | Start Place - End Place, distance, duration, ¥price (for example 3.2km, 15min, ¥25)
HH:MM-HH:MM | attraction | Attraction Name, ¥price/person
HH:MM-HH:MM | meal | Lunch or Dinner, Restaurant Name, ¥price/person
HH:MM-HH:MM | hotel | Check-in, Check-out or Rest, Hotel Name
HH:MM-HH:MM | buffer | what the time is for
Each activity starts the minute the previous one ends: no gaps and no overlaps. A buffer fills the time that \
intercity travel needs (security check and boarding before it, deplaning and baggage claim after it, a layover \
between two legs) or a short pause between two activities in the city. Every line that costs money (travel, \
attraction, meal) shows its price.
After the last day, still inside <plan>, write an itemized budget summary, each line with the sum that gives it:
Budget Summary:
Transportation: N RMB
Accommodation: N RMB
Meals: N RMB
Attractions & Tickets: N RMB
Total Estimated Budget: N RMB

RULES THE PLAN IS SCORED ON
Route
- The trip leaves from the user's home city and ends back there.
- Whenever one activity ends somewhere other than where the next begins, a travel_city or travel_intercity_public \
line takes the traveller from the one place to the other.
Times
- A train or flight line keeps the tool's departure and arrival times exactly.
- A travel_city line lasts the route tool's duration, give or take 5 minutes.
- A meal lasts 1 to 2 hours, inside the restaurant's opening_time-closing_time.
- An attraction visit lies inside its opening hours, on a day that is not one of its closed dates, and lasts \
between its minimum and maximum visit duration.
- Leave realistic buffers: at least 30-45 minutes after a flight lands before the next ride, and enough time \
before boarding.
Meals
- No breakfast: it is eaten at the hotel. At least 2 hours pass between the end of lunch and the start of dinner.
- A full day in one city has lunch and dinner.
- Arrival day, by the time you arrive: before 10:00, lunch and dinner; 10:00-15:00, dinner, lunch optional; after \
15:00, dinner at most.
- Departure day, by the time you leave: before 9:00, no meal in that city; 9:00-15:00, lunch optional and no \
dinner; after 15:00, at least lunch, dinner optional.
Shape of a day
- Every day but the last ends back at the hotel: its last line is a hotel line (Rest).
- The last day ends with the journey home: its last line is the train or flight that reaches the home city.
- No long idle stretches. A full day holds at least 2 attractions, or at least 4 hours at one large attraction, \
counting the rides to and from it. A travel day that arrives before 12:00 holds at least 1 attraction, and one \
that leaves after 16:00 holds at least 1 attraction before leaving.
- No restaurant and no attraction twice in the trip.
Data and budget
- Names, train and flight numbers, times and prices match the tool results exactly.
- Costs count as follows: train and flight tickets, attraction tickets and meals per person; a travel_city price \
per car, with up to 4 people in a car and the number of cars rounded up; a hotel price per room and night (rooms \
times nights).
- Each summary line is the exact sum of that kind of cost in the plan; the total is the sum of them all and stays \
within the user's budget.

EXAMPLE (its names and prices only illustrate the format: use those the tools return)
Request: 2 people from Shanghai to Suzhou, 2 days, 1 room.
<plan>
Day 1:
Current City: from Shanghai to Suzhou
Accommodation: Canal View Hotel, ¥600/room/night
08:00-08:30 | travel_intercity_public | train G7001, Shanghai Railway Station - Suzhou Railway Station, ¥40/person
08:30-08:50 | buffer | Leaving the station
08:50-09:10 | travel_city | Suzhou Railway Station - Canal View Hotel, 5.1km, 20min, ¥18
09:10-09:40 | hotel | Check-in, Canal View Hotel
09:40-09:55 | travel_city | Canal View Hotel - Humble Garden, 1.8km, 15min, ¥0
09:55-12:25 | attraction | Humble Garden, ¥70/person
12:25-12:35 | travel_city | Humble Garden - Pingjiang Noodle Shop, 0.6km, 10min, ¥0
12:35-13:35 | meal | Lunch, Pingjiang Noodle Shop, ¥45/person
13:35-13:55 | travel_city | Pingjiang Noodle Shop - Tiger Hill, 6.3km, 20min, ¥22
13:55-16:25 | attraction | Tiger Hill, ¥60/person
16:25-16:45 | travel_city | Tiger Hill - Canal View Hotel, 6.0km, 20min, ¥21
16:45-17:45 | hotel | Rest, Canal View Hotel
17:45-17:55 | travel_city | Canal View Hotel - Songhe Restaurant, 0.9km, 10min, ¥0
17:55-19:25 | meal | Dinner, Songhe Restaurant, ¥120/person
19:25-19:35 | travel_city | Songhe Restaurant - Canal View Hotel, 0.9km, 10min, ¥0
19:35-24:00 | hotel | Rest, Canal View Hotel

Day 2:
Current City: from Suzhou to Shanghai
Accommodation: -
08:30-09:00 | hotel | Check-out, Canal View Hotel
09:00-09:15 | travel_city | Canal View Hotel - Lion Grove Garden, 1.5km, 15min, ¥0
09:15-11:15 | attraction | Lion Grove Garden, ¥40/person
11:15-11:25 | travel_city | Lion Grove Garden - Guanqian Dumpling House, 0.7km, 10min, ¥0
11:25-12:25 | meal | Lunch, Guanqian Dumpling House, ¥50/person
12:25-12:45 | travel_city | Guanqian Dumpling House - Suzhou Railway Station, 3.9km, 20min, ¥15
12:45-13:15 | buffer | Security check and boarding
13:15-13:45 | travel_intercity_public | train G7012, Suzhou Railway Station - Shanghai Railway Station, ¥40/person

Budget Summary:
Transportation: 236 RMB. Trains (40+40)*2=160; taxis, one car for 2 people: 18+22+21+15=76
Accommodation: 600 RMB. 1 room, 1 night: 600*1*1=600
Meals: 430 RMB. (45+120+50)*2=430
Attractions & Tickets: 340 RMB. (70+60+40)*2=340
Total Estimated Budget: 1606 RMB
</plan>"""


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
